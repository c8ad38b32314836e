"""Training one configuration: one `fit` for the CLI, a Ray Tune trial and the final stage."""

from marsseg.device import resolve_device
from marsseg.train.batches import PreparedData, prepare_data
from marsseg.train.keys import EPOCH_METRICS
from marsseg.train.loop import FitResult, evaluate, fit
from marsseg.train.state import EpochState

__all__ = [
    "EPOCH_METRICS",
    "EpochState",
    "FitResult",
    "PreparedData",
    "evaluate",
    "fit",
    "prepare_data",
    "resolve_device",
]
