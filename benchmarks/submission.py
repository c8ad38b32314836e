"""Time `write_submission` against the course's pandas helper on random test-set-sized masks.

Checks in the same run that both files are byte-identical, so a speed-up is only reported for
output the scorer cannot tell apart, then times `read_submission` on the result.

    python -m benchmarks.submission            # full test set: 10022 masks, 82 M cells
    python -m benchmarks.submission --n 500    # quick run
"""

from __future__ import annotations

import argparse
import filecmp
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from benchmarks.record import write_results
from marsseg.classes import IMAGE_SHAPE, NUM_CLASSES
from marsseg.submission import pandas_reference_csv, read_submission, write_submission

TEST_SET_SIZE = 10022
T = TypeVar("T")


def _timed(action: Callable[[], T]) -> tuple[float, T]:
    """Wall-clock seconds of one call and its result: each call takes seconds, so one is enough."""
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=TEST_SET_SIZE, help="number of masks (M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    preds = rng.integers(0, NUM_CLASSES, size=(args.n, *IMAGE_SHAPE), dtype=np.uint8)
    print(f"{args.n} masks of {IMAGE_SHAPE}: {preds.size / 1e6:.1f} M cells")

    with tempfile.TemporaryDirectory(prefix="marsseg-submission-bench-") as folder:
        reference, ours = Path(folder, "pandas.csv"), Path(folder, "ours.csv")
        pandas_s, _ = _timed(lambda: pandas_reference_csv(preds, reference))
        print(f"pandas y_to_df(...).to_csv: {pandas_s:8.2f} s")
        ours_s, _ = _timed(lambda: write_submission(preds, ours))
        print(f"write_submission:           {ours_s:8.2f} s")
        if not filecmp.cmp(reference, ours, shallow=False):
            print("FAIL: the two files differ")
            return 1
        size_mb = ours.stat().st_size / 1e6
        print(f"files byte-identical ({size_mb:.1f} MB); speed-up {pandas_s / ours_s:.1f}x")
        read_s, masks = _timed(lambda: read_submission(ours, n_rows=args.n))
        print(f"read_submission:            {read_s:8.2f} s")
        if not np.array_equal(masks, preds):
            print("FAIL: read_submission did not give back the written masks")
            return 1
        gz = Path(folder, "ours.csv.gz")
        gz_s, _ = _timed(lambda: write_submission(preds, gz))
        gz_mb = gz.stat().st_size / 1e6  # random labels: real masks compress far better
        print(f"write_submission (.csv.gz): {gz_s:8.2f} s, {gz_mb:.1f} MB of random labels")
    rows = [
        {"step": "pandas to_csv", "seconds": pandas_s, "mb": size_mb},
        {"step": "write_submission", "seconds": ours_s, "mb": size_mb},
        {"step": "write_submission .csv.gz", "seconds": gz_s, "mb": gz_mb},
        {"step": "read_submission", "seconds": read_s, "mb": size_mb},
    ]
    write_results("submission", rows, masks=args.n, speedup=pandas_s / ours_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
