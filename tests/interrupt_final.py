"""`python tests/interrupt_final.py ARGS`: `search.final ARGS` on a 2-CPU local Ray, killed
(SIGKILL, as a lost driver dies) once one fold has finished and another has checkpointed an epoch.

With `--cpus-per-trial 2` the folds run one at a time, so the moment is always the same: the
first fold's result is saved, the second has written its first checkpoint, nothing else is done.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import ray

from search import final
from search.runstore import RunStore

save_result = RunStore.save_result


def save_then_die(store: RunStore, index: int, name: str, result: dict) -> None:
    save_result(store, index, name, result)
    mine = store.folder(index, name)
    while not [p for p in store.root.glob("*/checkpoint.pt") if p.parent != mine]:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False)
    RunStore.save_result = save_then_die
    sys.exit(final.main(sys.argv[1:]))
