"""The Ray Tune trainable: a thin adapter from a trial's config to `marsseg.train.fit`.

Everything about scheduling lives in `search/run.py`; this function only builds the training
config from the trial's parameters, resumes from Tune's checkpoint when there is one, and turns
each epoch into `tune.report(metrics, checkpoint=...)`. The dataset arrives through the object
store (`tune.with_parameters`), never from a path on the driver's disk.

Each result also says where the trial's own time went beside training, for `search.timeline`:
`setup_s` (first result of a run: preparing data and model before the first epoch) and
`report_prep_s` (writing the TensorBoard panel and the checkpoint before reporting).
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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
    epochs (ASHA and the searcher take a repeated epoch's result as the same step).
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
        resume = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            resume = Path(checkpoint.to_directory(folder)) / CHECKPOINT_FILE
        try:
            fit(
                config,
                data,
                on_epoch=reporter,
                checkpoint=resume,
                num_threads=cpus,
                workers=workers,
            )
        finally:
            panel.close()


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
        self.writer: SummaryWriter | None = None
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
        if self.writer is None:
            self.writer = SummaryWriter(str(self.trial_dir))
        device = next(state.eval_model.parameters()).device
        dtype = autocast_dtype_for(self.config, device)
        preds = predict_masks(
            [state.eval_model], self.images, device, tta=False, autocast_dtype=dtype
        )
        panel = prediction_panel(self.images, self.masks, preds)
        self.writer.add_image("val/input_truth_prediction", panel, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
