"""The Ray Tune trainable: a thin adapter from a trial's config to `marsseg.train.fit`.

Everything about scheduling lives in `search/run.py`; this function only builds the training
config from the trial's parameters, resumes from Tune's checkpoint when there is one, and turns
each epoch into `tune.report(metrics, checkpoint=...)`. The dataset arrives through the object
store (`tune.with_parameters`), never from a path on the driver's disk.

Each result also says where the trial's own time went beside training, for `search.timeline`:
`setup_s` (first result of a run: preparing data and model before the first epoch) and
`report_prep_s` (writing the TensorBoard panel and the checkpoint before reporting).

A trial resumes from Tune's latest checkpoint, or, when that one cannot be read, from the older
ones Tune kept beside it (see `resume_candidates`), or from scratch, printing which.
"""

from __future__ import annotations

import posixpath
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import ray
from ray import tune
from tensorboardX import SummaryWriter

from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.data.figures import prediction_panel
from marsseg.precision import autocast_dtype_for
from marsseg.predict import predict_masks
from marsseg.train import EpochState, PreparedData, fit, prepare_data
from marsseg.train.keys import EPOCH, EPOCH_TIME_S, FINISHED
from spaces import params_to_config

CHECKPOINT_FILE = "checkpoint.pt"
PANEL_IMAGES = 6
"""Validation images shown in each trial's TensorBoard panel (the same ones every epoch)."""
PANEL_TAG = "val/input_truth_prediction"
"""The panel's TensorBoard tag (under IMAGES)."""
PANEL_EVERY = 5
"""A panel at epoch 1 and every this many epochs after, and at the last epoch."""


def train_trial(
    params: dict[str, Any],
    *,
    archive: MarsArchive,
    base: dict[str, Any],
    workers: int = 0,
    checkpoint_every: int = 1,
) -> None:
    """Train one trial: `params` come from the search space, `base` fills everything else.

    A checkpoint goes with every `checkpoint_every`-th epoch and with the last one; a trial
    resumed after a failure restarts from the latest, redoing at most `checkpoint_every - 1`
    epochs (ASHA and the searcher take a repeated epoch's result as the same step); from an
    older one, or from scratch, when the latest cannot be read (see `resume_candidates`).
    """
    entered = time.perf_counter()
    config = params_to_config(params, TrainConfig.from_dict(base))
    context = tune.get_context()
    cpus = int(context.get_trial_resources().required_resources.get("CPU", 1))
    data = prepare_data(config, archive)
    # Tune runs the trial in its own working folder, which `SyncConfig(sync_artifacts=True)`
    # uploads to the experiment's storage: files written here reach it from any node.
    panel = _PanelWriter(Path.cwd(), data, config)
    reporter = _Reporter(panel, checkpoint_every, entered)
    with tempfile.TemporaryDirectory() as folder:
        fit(
            config,
            data,
            on_epoch=reporter,
            checkpoint=downloaded(resume_candidates(tune.get_checkpoint()), Path(folder)),
            num_threads=cpus,
            workers=workers,
        )


def resume_candidates(latest: tune.Checkpoint | None) -> list[tune.Checkpoint]:
    """Tune's latest checkpoint of this trial, then the older ones kept beside it, newest first.

    `tune.get_checkpoint()` gives only the latest; `CheckpointConfig(num_to_keep=2)` keeps one
    more (the best-scoring other one) in the same trial folder, where Tune names them
    `checkpoint_<index>`. They are found by listing that folder through the checkpoint's own
    `filesystem` (pyarrow: local, NFS or S3 alike) rather than by storing a copy of the
    previous state inside every checkpoint: that would double every checkpoint's upload, and a
    folder damaged as a whole would take both copies with it. Folders newer than the latest
    (uploaded by a run whose report never reached Tune) are left out.
    """
    if latest is None:
        return []
    path = latest.path.rstrip("/")
    parent, name = posixpath.split(path)
    try:
        listing = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError as error:
        print(f"cannot list the older checkpoints beside {path}: {error}")
        return [latest]
    older = sorted(
        (
            info.path
            for info in listing
            if info.type == pyarrow.fs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.base_name < name
        ),
        reverse=True,
    )
    return [latest, *(tune.Checkpoint(p, filesystem=latest.filesystem) for p in older)]


def downloaded(checkpoints: list[tune.Checkpoint], folder: Path) -> Iterator[Path]:
    """Each checkpoint's file, downloaded into `folder` only when `fit` reaches it (a damaged
    latest is read once and skipped, never resumed from); one that cannot be fetched is
    skipped, saying so."""
    for index, checkpoint in enumerate(checkpoints):
        target = folder / str(index)
        try:
            yield Path(checkpoint.to_directory(str(target))) / CHECKPOINT_FILE
        except OSError as error:
            print(f"checkpoint {checkpoint.path} cannot be fetched ({error}); skipping it")


class _Reporter:
    """`fit`'s `on_epoch` in a trial: the panel, the checkpoint, then `tune.report`."""

    def __init__(self, panel: _PanelWriter, checkpoint_every: int, entered: float) -> None:
        self.panel = panel
        self.checkpoint_every = checkpoint_every
        self.entered = entered
        self.first_epoch = True  # of this run of the trial (a retried or resumed trial reruns)
        # Where this run of the trial lives: the node id tells apart nodes that share a host
        # (and a trial retried after its node died reports a different one from then on).
        self.node = {
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def __call__(self, metrics: dict[str, Any], state: EpochState) -> None:
        reached = time.perf_counter()
        times = {}
        if self.first_epoch:
            times["setup_s"] = reached - self.entered - metrics[EPOCH_TIME_S]
            self.first_epoch = False
        self.panel.maybe_write(metrics, state)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if metrics[FINISHED] or metrics[EPOCH] % self.checkpoint_every == 0:
                state.save(Path(folder) / CHECKPOINT_FILE)
                checkpoint = tune.Checkpoint.from_directory(folder)
            times["report_prep_s"] = time.perf_counter() - reached
            tune.report({**metrics, **self.node, **times}, checkpoint=checkpoint)


class _PanelWriter:
    """Writes a colour-coded input / truth / prediction panel to the trial's TensorBoard files."""

    def __init__(self, trial_dir: Path, data: PreparedData, config: TrainConfig) -> None:
        self.config = config
        self.trial_dir = trial_dir
        self.images = self.masks = None
        if data.val_images is not None:
            # A spread of fixed images, big-rock ones first: the class the score hinges on.
            rocky = np.flatnonzero((data.val_masks == 4).any(axis=(1, 2)))
            rest = np.setdiff1d(np.arange(len(data.val_masks)), rocky)
            chosen = np.concatenate([rocky[: PANEL_IMAGES // 2], rest])[:PANEL_IMAGES]
            self.images, self.masks = data.val_images[chosen], data.val_masks[chosen]

    def maybe_write(self, metrics: dict[str, Any], state: EpochState) -> None:
        epoch = metrics[EPOCH]
        if self.images is None or not (epoch == 1 or epoch % PANEL_EVERY == 0 or metrics[FINISHED]):
            return
        device = next(state.eval_model.parameters()).device
        dtype = autocast_dtype_for(self.config, device)
        preds = predict_masks(
            [state.eval_model], self.images, device, tta=False, autocast_dtype=dtype
        )
        write_panel(self.trial_dir, prediction_panel(self.images, self.masks, preds), epoch)


def write_panel(folder: Path, panel: np.ndarray, step: int) -> None:
    """Write `panel` (H, W, 3) as an image at `step` into an event file of its own in `folder`,
    complete on disk when this returns.

    tensorboardX writes events from a background thread and its `flush()` does not wait for it,
    so an epoch's report (whose checkpoint makes Tune upload the working folder) used to copy an
    event file without its last record, or without that record's checksum: TensorBoard then
    dropped the panel. Closing the writer drains its queue and closes the file; the next panel
    goes to a new file (TensorBoard reads every event file of a folder as one run). The suffix
    keeps two panels written within one second (file names carry whole seconds) apart.
    """
    with SummaryWriter(str(folder), filename_suffix=f".panel-{step:05d}") as writer:
        writer.add_image(PANEL_TAG, panel, step, dataformats="HWC")
