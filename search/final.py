"""`python -m search.final`: train a chosen configuration for real and write the Kaggle submission.

    python -m search.final --config results/marsseg-1/best_config.yaml --data mars_for_students.npz
    python -m search.final --config results/marsseg-1/best_config.yaml --folds 5     # an ensemble
    python -m search.final --config results/marsseg-1/best_config.yaml --rerank 3    # robust pick

Without `--folds` it trains one model on all cleaned training data for a fixed number of epochs:
`--max-epochs`, or the search's best epoch scaled by 1 / (1 - val_fraction) (the final run sees
that much more data, so it overfits that much later). With `--folds K` it trains K models with
early stopping on K stratified folds, reports their out-of-fold mIoU, fits per-class decoding
offsets on the out-of-fold probabilities (`--no-calibration`: none) and averages the K models'
probabilities. `--rerank N` first retrains the top-N exported configs (the `top-*.yaml` files
beside `--config`) with a few seeds and keeps the best mean score: one validation split is small
and noisy.

The folds and the rerank runs are Ray tasks, all submitted at once: `--cpus-per-trial` CPUs
(torch threads; default 1) and `--gpus-per-trial` GPUs each (0.25 packs 4 on a GPU), on a local
Ray or a cluster (`--address auto`); Ray queues what does not fit, so one core runs them one by
one. `--cpus-per-trial` (default: torch's own) and `--device` also apply to this process: the
all-data model and the test predictions. Every epoch of every model prints one line as it ends,
labelled by its fold, rerank run or `all data`. Each fold's weights are saved as it ends
(`folds/fold-<k>.pt`, a model file of its own); if a fold fails the others still finish, and the
command ends naming the fold and its error, without a submission.

Folds and rerank runs checkpoint every epoch under `--out` (`folds/`, `rerank/`), and keep their
results there as they end: rerunning the same command after a stop (Ctrl-C, a lost node, a
failed fold) loads the finished ones and continues the others from their last epoch. A rerun
with another config, data, fold count, seed or TTA is refused, naming what differs; `--force`
starts over.

The output folder gets `submission.csv` (`.csv.gz` with `--compress`), `model.pt` (every
member's weights, the config and the offsets) and `report.md` with its PNGs.

A config exported from a search records the checksum of the cleaned archive it was searched on;
other data is refused before any training (`--any-data` trains it anyway). The command only
parses: `train_final(config, archive, FinalSettings.from_args(...))` does the work, for
`search.run --final` as well (it hands its flags on to this parser).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from marsseg.calibrate import Calibration, fit_offsets, format_offsets
from marsseg.classes import CLASS_NAMES, NUM_CLASSES, SCORED_CLASSES
from marsseg.cli import (
    COUNT,
    FOLDS,
    WORKERS,
    ArgumentParser,
    add_decoding_flags,
    add_max_epochs_flag,
    command,
    program,
    torch_threads,
)
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive, kfold_plans, load_clean_archive, train_val_split
from marsseg.errors import ConfigError, DataError
from marsseg.fileio import check_output, check_writable
from marsseg.metrics import Scores, decode_probabilities, score_masks
from marsseg.predict import (
    check_target,
    predict_probabilities,
    predict_submission,
    require_test_set,
    save_models,
)
from marsseg.report import write_report
from marsseg.submission import submission_bytes
from marsseg.train import fit, resolve_device
from marsseg.train.loop import OnEpoch
from marsseg.train.progress import print_epochs
from search.capacity import start_ray
from search.runstore import RunStore
from search.tasks import (
    Failures,
    Run,
    add_resource_flags,
    fit_split,
    train_runs,
)

SAMPLE_IMAGES = 6
FOLDS_DIR = "folds"
"""Where each fold checkpoints its epochs and its weights and out-of-fold probabilities land as
it ends (a `RunStore`), so a failed fold loses only itself and a rerun continues the others."""
RERANK_DIR = "rerank"
"""The `RunStore` of the `--rerank` runs."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("search.final", "marsseg-final"),
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--config", type=Path, required=True, help="training config (YAML/JSON)")
    parser.add_argument("--data", type=Path, help="archive (default: the synthetic one)")
    parser.add_argument("--folds", type=FOLDS, help="train K models on K folds and ensemble them")
    add_max_epochs_flag(
        parser,
        "epochs of the all-data model, or the most of each fold (default: from the search's "
        "best epoch; for folds, the config's max_epochs)",
    )
    parser.add_argument("--rerank", type=COUNT, help="retrain the top N exported configs first")
    parser.add_argument(
        "--rerank-seeds", type=COUNT, default=2, help="seeds per reranked config (default: 2)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: results/final/<name>)")
    parser.add_argument(
        "--workers", type=WORKERS, default=0, help="loader workers (online aug; default: 0)"
    )
    parser.add_argument(
        "--compress", action="store_true", help="write submission.csv.gz (~1 MB, not ~30 MB)"
    )
    parser.add_argument(
        "--no-calibration", action="store_true", help="--folds: no per-class decoding offsets"
    )
    parser.add_argument(
        "--any-data",
        action="store_true",
        help="train even on data other than the search's (its provenance checksum)",
    )
    add_resource_flags(
        parser,
        "fold or rerank run",
        cpus_help="CPUs (torch threads) of each fold or rerank run, and torch threads of the "
        "all-data model and predictions here (default: 1 per run; torch's own here)",
    )
    add_decoding_flags(
        parser,
        force_help="overwrite an existing submission, and start the folds and rerank runs over "
        "instead of continuing those an earlier run left in --out",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def final_epochs(config: TrainConfig, requested: int | None) -> tuple[int, str]:
    """Epochs for training on all data, and where the number came from."""
    if requested is not None:
        return requested, "--max-epochs"
    best = config.provenance.get("best_epoch")
    if best:
        epochs = max(1, math.ceil(best / (1 - config.val_fraction)))
        return epochs, f"search best epoch {best} / (1 - val_fraction {config.val_fraction:g})"
    return config.max_epochs, "the config's max_epochs (no search provenance)"


def rerank_candidates(config_path: Path, n: int) -> list[Path]:
    """The top-n exported configs beside `config_path` (`search.export` writes them there)."""
    candidates = sorted(config_path.parent.glob("top-*.yaml"))[:n]
    if not candidates:
        raise ConfigError(f"--rerank: no top-*.yaml configs beside {config_path}")
    return candidates


def rerank(
    config_path: Path,
    n: int,
    seeds: int,
    archive: MarsArchive,
    *,
    cpus: float,
    gpus: float,
    workers: int = 0,
    store_root: Path | None = None,
    force: bool = False,
) -> TrainConfig:
    """Retrain the top-n exported configs with `seeds` seeds each; the best mean val mIoU wins.

    Each run scores on the split its seed draws, as the search's trials did. With `store_root`
    the runs keep their checkpoints and results there (a `RunStore`), so the same call again
    continues them (another set of configs, seeds or data is refused unless `force`).
    """
    candidates = rerank_candidates(config_path, n)
    configs = {path: TrainConfig.load(path) for path in candidates}
    runs = {}
    for path, config in configs.items():
        if not 0 < config.val_fraction < 1:
            raise ConfigError(f"--rerank: {path.name} has val_fraction {config.val_fraction:g}")
        for seed in range(seeds):
            split = train_val_split(archive.masks, config.val_fraction, seed)
            name = f"rerank {path.name} seed {seed}"
            runs[(path, seed)] = Run(name, config.replace(seed=seed), split)
    scores: dict[Path, list[float]] = {path: [] for path in candidates}
    failures = Failures()
    store = None
    if store_root is not None:
        plan = {"stage": "rerank", "seeds": seeds}
        plan["configs"] = {path.name: config.to_dict() for path, config in configs.items()}
        store = open_store(store_root, plan, archive, force=force)
    tasks = {"cpus": cpus, "gpus": gpus, "workers": workers}
    done = train_runs(runs, archive, **tasks, desc="rerank", store=store)
    for key, row, reason in done:
        name = runs[key].name
        if reason is not None:
            failures.add(name, reason)
            continue
        scores[key[0]].append(row["val_miou"])
        tqdm.write(f"{name}: val mIoU {row['val_miou']:.4f} at epoch {row['best_epoch']}")
    failures.check()
    return best_mean(configs, scores)


def best_mean(configs: dict[Path, TrainConfig], scores: dict[Path, list[float]]) -> TrainConfig:
    """The config whose seeds scored best on average; each config's mean and spread printed."""
    best_config, best = None, -math.inf
    for path, config in configs.items():
        mean = float(np.mean(scores[path]))
        spread = float(np.std(scores[path]))
        seeds = len(scores[path])
        print(f"rerank {path.name}: val mIoU {mean:.4f} +- {spread:.4f} over {seeds} seeds")
        if mean > best:
            best_config, best = config, mean
    print(f"rerank: keeping {best_config.provenance.get('trial', '?')} (mean {best:.4f})")
    return best_config


def train_fold(
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    *,
    threads: int,
    workers: int = 0,
    tta: bool = True,
    on_epoch: OnEpoch | None = None,
    checkpoint: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """One fold (a Ray task, continued from `checkpoint` when given): its best weights on the
    CPU, its history, and its out-of-fold probabilities (N_val, 5, H, W) float16, flip-averaged
    with `tta` as the test set will be."""
    data, result = fit_split(config, archive, split, threads, workers, on_epoch, checkpoint)
    model = result.model
    device = next(model.parameters()).device
    images = data.val_images
    probs = np.empty((len(images), NUM_CLASSES, *images.shape[1:]), dtype=np.float16)
    for window, mean in predict_probabilities(model, images, device, tta=tta):
        probs[window] = mean.cpu().numpy()
    return {
        "val_idx": split[1],
        "probs": probs,
        "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "history": result.history,
        "best_epoch": result.best_epoch,
    }


def train_folds(
    config: TrainConfig,
    archive: MarsArchive,
    folds: int,
    folds_dir: Path,
    *,
    tta: bool,
    metric_aware: bool,
    cpus: float,
    gpus: float,
    workers: int = 0,
    force: bool = False,
) -> tuple[list[nn.Module], list[list[dict[str, Any]]], np.ndarray]:
    """K models on K stratified folds as Ray tasks, and the out-of-fold probabilities of every
    training image (each is in exactly one fold's validation set); see `collect_folds`.

    The folds keep their checkpoints and results in `folds_dir` (a `RunStore`): the same call
    again continues them; one with another config, data, fold count or TTA is refused unless
    `force` starts over."""
    plans = kfold_plans(archive.masks, folds, config.seed)
    runs = {k: Run(fold_name(k, folds), config, plan) for k, plan in enumerate(plans)}
    store = open_store(
        folds_dir,
        {"stage": "folds", "folds": folds, "config": config.to_dict(), "tta": tta},
        archive,
        force=force,
    )
    tasks = {"cpus": cpus, "gpus": gpus, "workers": workers}
    try:
        done = train_runs(
            runs, archive, **tasks, desc="folds", task=train_fold, store=store, tta=tta
        )
        return collect_folds(config, archive, runs, done, folds_dir, metric_aware=metric_aware)
    finally:
        store.discard_if_empty()


def open_store(root: Path, plan: dict[str, Any], archive: MarsArchive, *, force: bool) -> RunStore:
    """The `RunStore` of a stage's runs, for `plan` on `archive`'s data; the runs it already
    holds results of are named (they are not trained again)."""
    store = RunStore(root)
    finished = store.open({**plan, "data_checksum": archive.checksum()}, force=force)
    if finished:
        print(f"continuing the runs in {root}: {len(finished)} finished, kept")
    return store


def fold_name(k: int, folds: int) -> str:
    """`fold 2/5` for k = 1: how progress lines and messages name a fold."""
    return f"fold {k + 1}/{folds}"


def collect_folds(
    config: TrainConfig,
    archive: MarsArchive,
    runs: Mapping[int, Run],
    done: Iterable[tuple[int, dict[str, Any] | None, str | None]],
    folds_dir: Path,
    *,
    metric_aware: bool,
) -> tuple[list[nn.Module], list[list[dict[str, Any]]], np.ndarray]:
    """Report and save each fold of `runs` as it ends (`done`, from `train_runs`) and gather the
    out-of-fold probabilities; name the failed folds together once the others have finished."""
    folds = len(runs)
    oof = np.zeros((len(archive), NUM_CLASSES, *archive.images.shape[1:]), dtype=np.float16)
    models: dict[int, nn.Module] = {}
    histories: dict[int, list[dict[str, Any]]] = {}
    failures = Failures()
    folds_dir.mkdir(parents=True, exist_ok=True)
    for k, fold, reason in done:
        name = runs[k].name
        if reason is not None:
            failures.add(name, reason)
            continue
        model = config.model.build()
        model.load_state_dict(fold["weights"])
        save_models(folds_dir / f"fold-{k + 1}.pt", config, [model])
        models[k], histories[k] = model.eval(), fold["history"]
        val = fold["val_idx"]
        oof[val] = fold["probs"]
        preds = decode_probabilities(fold["probs"], metric_aware=metric_aware)
        score = score_masks(preds, archive.masks[val]).mean_iou
        tqdm.write(
            f"{name}: best epoch {fold['best_epoch']}, val mIoU {score:.4f}"
            " (decoded as the submission is, unlike the epoch lines)"
        )
    kept = f"{len(models)} finished fold(s) saved in {folds_dir}" if models else "none finished"
    failures.check(f"{kept}; no submission written")
    order = range(folds)
    return [models[k] for k in order], [histories[k] for k in order], oof


def calibration_lines(calibration: Calibration) -> list[str]:
    """Per-class out-of-fold IoU before and after the offsets, for the console."""
    before, after = calibration.before, calibration.after
    lines = [
        f"calibration: {format_offsets(calibration.offsets)} "
        f"(out-of-fold mIoU {before.mean_iou:.4f} -> {after.mean_iou:.4f})"
    ]
    for c in SCORED_CLASSES:
        lines.append(
            f"  {CLASS_NAMES[c]:<9} IoU {before.iou[c]:.4f} -> {after.iou[c]:.4f} "
            f"(offset {calibration.offsets[c]:+.2f})"
        )
    return lines


def out_of_fold(
    oof: np.ndarray, archive: MarsArchive, *, metric_aware: bool, calibrate: bool
) -> tuple[Scores, Calibration | None, np.ndarray]:
    """Score the out-of-fold probabilities, fit the offsets on them when asked, and return the
    scores and labels of the decoding the submission will use."""
    preds = decode_probabilities(oof, metric_aware=metric_aware)
    scores = score_masks(preds, archive.masks)
    print(f"out-of-fold mIoU {scores.mean_iou:.4f}")
    if not calibrate:
        return scores, None, preds
    calibration = fit_offsets(oof, archive.masks)
    print("\n".join(calibration_lines(calibration)))
    preds = decode_probabilities(oof, metric_aware=metric_aware, offsets=calibration.offsets)
    return score_masks(preds, archive.masks), calibration, preds


@dataclass(frozen=True)
class FinalSettings:
    """How `train_final` trains and where it writes: everything but the config and the data.

    `config_path` names the config in messages and finds the `top-*.yaml` files `rerank`
    retrains. `cpus` None gives each task 1 CPU and leaves this process torch's own threads;
    `gpus` None asks for 1 per task when Ray has GPUs. `command` is the line the report records
    (empty: none).
    """

    out: Path
    config_path: Path | None = None
    folds: int | None = None
    max_epochs: int | None = None
    rerank: int | None = None
    rerank_seeds: int = 2
    tta: bool = True
    metric_aware: bool = True
    calibrate: bool = True
    compress: bool = False
    force: bool = False
    any_data: bool = False
    cpus: float | None = None
    gpus: float | None = None
    address: str | None = None
    workers: int = 0
    device: str | None = None
    command: str = ""

    def __post_init__(self) -> None:
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {self.folds}")
        if self.rerank and self.config_path is None:
            raise ConfigError("--rerank needs the config's path: its top-*.yaml lie beside it")
        if self.rerank:
            rerank_candidates(self.config_path, self.rerank)

    @property
    def submission_path(self) -> Path:
        return self.out / ("submission.csv.gz" if self.compress else "submission.csv")

    @classmethod
    def from_args(cls, args: argparse.Namespace, command: str = "") -> FinalSettings:
        """The settings `parse_args` describes (the output folder defaults by the config's name):
        the one way they are built, also by `search.run --final`."""
        return cls(
            out=args.out or Path("results") / "final" / args.config.stem,
            config_path=args.config,
            folds=args.folds,
            max_epochs=args.max_epochs,
            rerank=args.rerank,
            rerank_seeds=args.rerank_seeds,
            tta=not args.no_tta,
            metric_aware=not args.no_metric_aware,
            calibrate=not args.no_calibration,
            compress=args.compress,
            force=args.force,
            any_data=args.any_data,
            cpus=args.cpus_per_trial,
            gpus=args.gpus_per_trial,
            address=args.address,
            workers=args.workers,
            device=args.device,
            command=command,
        )


@dataclass(frozen=True)
class FinalResult:
    """What `train_final` wrote, and the config and scores behind it."""

    submission: Path
    model: Path
    report: Path
    config: TrainConfig
    """The config trained (after `--rerank` and the epochs it was given)."""
    scores: Scores | None
    """Out-of-fold scores with `folds` (calibrated when offsets were fit); None on all data."""
    offsets: np.ndarray | None


@dataclass
class _Trained:
    """The members and what the report says about how they were trained."""

    config: TrainConfig
    models: list[nn.Module]
    histories: list[list[dict[str, Any]]]
    facts: dict[str, Any]
    score_label: str
    scores: Scores | None = None
    samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    calibration: Calibration | None = None


def check_data(config: TrainConfig, archive: MarsArchive, settings: FinalSettings) -> None:
    """Refuse data other than what the config was searched on, unless `settings.any_data`.

    The search records the checksum of its whole cleaned archive (`data_images`, when present,
    counts the first images it trained on); a config without one (hand-written) is not checked.
    """
    searched = config.provenance.get("data_checksum")
    if not searched or settings.any_data:
        return
    found = archive.checksum()
    if found != searched:
        name = settings.config_path or "the config"
        raise DataError(
            f"{name} was searched on data with checksum {searched} but --data {archive.source} "
            f"has checksum {found}; pass --any-data to train it on other data anyway"
        )


def train_final(config: TrainConfig, archive: MarsArchive, settings: FinalSettings) -> FinalResult:
    """Train `config` for real on `archive` (cleaned, with its test set) and write the submission,
    `model.pt` and `report.md` into `settings.out`.

    Everything that can refuse (the submission path, its folder and free space, the test set,
    the data's checksum, the device) does so before any training. Folds and rerank runs are Ray
    tasks (Ray is started or joined here).
    """
    check_target(settings.submission_path, settings.force)
    require_test_set(archive)
    need = submission_bytes(len(archive.test_images), settings.compress)
    check_output(settings.submission_path, need, what="submission")
    check_data(config, archive, settings)
    if settings.folds:
        kfold_plans(archive.masks, settings.folds, config.seed)  # enough images for the folds
    threads = torch_threads(settings.cpus)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    tasks: dict[str, Any] = {}
    if settings.folds or settings.rerank:
        started = start_ray(settings.address, settings.cpus, settings.gpus)
        tasks = {"cpus": started.cpus, "gpus": started.gpus, "workers": settings.workers}
        print(f"training runs as Ray tasks, {started.cpus:g} CPU + {started.gpus:g} GPU each")
    if settings.rerank:
        config = rerank(
            settings.config_path,
            settings.rerank,
            settings.rerank_seeds,
            archive,
            **tasks,
            store_root=settings.out / RERANK_DIR,
            force=settings.force,
        )
    if settings.folds:
        trained = _train_ensemble(config, archive, settings, tasks)
    else:
        trained = _train_all_data(config, archive, settings, device)
    trained.facts["test-time augmentation"] = "horizontal flip" if settings.tta else "off"
    trained.facts["decoding"] = (
        "metric-aware (classes 1-4)" if settings.metric_aware else "plain argmax"
    )
    return _write_outputs(trained, archive, settings, device)


def _train_ensemble(
    config: TrainConfig, archive: MarsArchive, settings: FinalSettings, tasks: dict[str, Any]
) -> _Trained:
    """`settings.folds` models, their out-of-fold scores and (when asked) calibration."""
    folds, metric_aware = settings.folds, settings.metric_aware
    if settings.max_epochs:
        config = config.replace(max_epochs=settings.max_epochs)
    models, histories, oof = train_folds(
        config,
        archive,
        folds,
        settings.out / FOLDS_DIR,
        tta=settings.tta,
        metric_aware=metric_aware,
        **tasks,
        force=settings.force,
    )
    calibrate = metric_aware and settings.calibrate
    scores, calibration, preds = out_of_fold(
        oof, archive, metric_aware=metric_aware, calibrate=calibrate
    )
    chosen = slice(0, SAMPLE_IMAGES)
    facts: dict[str, Any] = {
        "training images (cleaned)": len(archive),
        "training": (
            f"{folds}-fold ensemble, early stopping per fold, up to {config.max_epochs} epochs"
        ),
    }
    if calibration is not None:
        facts["calibration"] = (
            f"per-class log-probability offsets fit on the out-of-fold probabilities: "
            f"{format_offsets(calibration.offsets)} (mIoU {calibration.gain:+.4f})"
        )
    elif not settings.calibrate:
        facts["calibration"] = "off (--no-calibration)"
    else:
        facts["calibration"] = "off (offsets are fit for metric-aware decoding)"
    label = f"out-of-fold ({folds} folds)" + (", calibrated" if calibration else "")
    samples = (archive.images[chosen], archive.masks[chosen], preds[chosen])
    return _Trained(config, models, histories, facts, label, scores, samples, calibration)


def _train_all_data(
    config: TrainConfig, archive: MarsArchive, settings: FinalSettings, device: torch.device
) -> _Trained:
    """One model on every cleaned training image, for a fixed number of epochs."""
    epochs, why = final_epochs(config, settings.max_epochs)
    config = config.replace(val_fraction=0.0, max_epochs=epochs)
    print(f"training on all {len(archive)} images for {epochs} epochs ({why})")
    result = fit(
        config,
        archive,
        device=device,
        num_threads=torch_threads(settings.cpus),
        workers=settings.workers,
        on_epoch=print_epochs(epochs, "all data"),
    )
    facts: dict[str, Any] = {
        "training images (cleaned)": len(archive),
        "training": f"one model on all data, {epochs} epochs ({why})",
    }
    if "val_miou" in config.provenance:
        facts["search validation mIoU"] = config.provenance["val_miou"]
    label = "held-out (none: trained on all data)"
    return _Trained(config, [result.model.cpu()], [result.history], facts, label)


def _write_outputs(
    trained: _Trained, archive: MarsArchive, settings: FinalSettings, device: torch.device
) -> FinalResult:
    """The submission, `model.pt` and `report.md` (with its PNGs) of what was trained."""
    settings.out.mkdir(parents=True, exist_ok=True)
    calibration = trained.calibration
    offsets = calibration.offsets if calibration is not None else None
    submission = predict_submission(
        trained.models,
        archive,
        settings.submission_path,
        tta=settings.tta,
        metric_aware=settings.metric_aware,
        device=device,
        offsets=offsets,
        force=settings.force,
    )
    model_path = save_models(settings.out / "model.pt", trained.config, trained.models, offsets)
    report_path = write_report(
        settings.out,
        config=trained.config,
        scores=trained.scores,
        score_label=trained.score_label,
        histories=trained.histories,
        samples=trained.samples,
        facts=trained.facts,
        commands=[settings.command] if settings.command else [],
        calibration=calibration,
    )
    print(f"wrote {submission}, {model_path} and {report_path}")
    return FinalResult(submission, model_path, report_path, trained.config, trained.scores, offsets)


def check_ray_flags(args: argparse.Namespace) -> None:
    """`--gpus-per-trial` and `--address` size and place the Ray tasks of `--folds` and
    `--rerank`; without them one model trains in this process, so a GPU asked for there would be
    silently unused (`--device` chooses this process's device)."""
    if args.folds or args.rerank:
        return
    for flag, value in (("--gpus-per-trial", args.gpus_per_trial), ("--address", args.address)):
        if value is not None:
            raise ConfigError(
                f"{flag} applies to the --folds and --rerank runs (Ray tasks); without them the "
                "model trains in this process: use --device (e.g. cuda) instead"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = TrainConfig.load(args.config)
    command = "python -m search.final " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = FinalSettings.from_args(args, command)
    # The cheapest refusals first, before the data is loaded or anything trains.
    check_ray_flags(args)
    check_target(settings.submission_path, settings.force)
    check_writable(settings.out)
    resolve_device(settings.device)
    archive, report = load_clean_archive(args.data)
    require_test_set(archive)
    print(report.summary())
    train_final(config, archive, settings)
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
