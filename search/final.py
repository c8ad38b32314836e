"""`python -m search.final`: train a chosen configuration for real and write the Kaggle submission.

    python -m search.final --config results/marsseg-1/best_config.yaml --data mars_for_students.npz
    python -m search.final --config results/marsseg-1/best_config.yaml --folds 5     # an ensemble
    python -m search.final --config results/marsseg-1/best_config.yaml --rerank 3    # robust pick

Without `--folds` it trains one model on all cleaned training data for a fixed number of epochs:
`--epochs`, or the search's best epoch scaled by 1 / (1 - val_fraction) (the final run sees that
much more data, so it overfits that much later). With `--folds K` it trains K models with early
stopping on K stratified folds, reports their out-of-fold mIoU, fits per-class decoding offsets
on the out-of-fold probabilities (`--no-calibration`: none) and averages the K models'
probabilities. `--rerank N` first retrains the top-N exported configs (the `top-*.yaml` files
beside `--config`) with a few seeds and keeps the best mean score: one validation split is small
and noisy.

The folds and the rerank runs are Ray tasks, all submitted at once: `--cpus-per-trial` CPUs
(torch threads) and `--gpus-per-trial` GPUs each (0.25 packs 4 on a GPU), on a local Ray or a
cluster (`--address auto`); Ray queues what does not fit, so one core runs them one by one.
`--threads` and `--device` apply to this process: the all-data model and the test predictions.
Each fold's weights are saved as it ends (`folds/fold-<k>.pt`, a model file of its own); if a
fold fails the others still finish, and the command ends naming the fold and its error,
without a submission.

The output folder gets `submission.csv` (`.csv.gz` with `--compress`), `model.pt` (every
member's weights, the config and the offsets) and `report.md` with its PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn
from tqdm import tqdm

from marsseg.calibrate import Calibration, apply_offsets, fit_offsets, format_offsets
from marsseg.classes import CLASS_NAMES, NUM_CLASSES, SCORED_CLASSES
from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive, kfold_plans, load_clean_archive, train_val_split
from marsseg.errors import ConfigError
from marsseg.metrics import Scores, decode, score_masks
from marsseg.predict import BATCH, predict_probabilities, save_models
from marsseg.report import write_report
from marsseg.train import fit, prepare_data, resolve_device
from search.predict import (
    add_decoding_flags,
    check_target,
    require_test_set,
    write_test_predictions,
)
from search.tasks import (
    TaskError,
    add_resource_flags,
    as_completed,
    start_ray,
    task_threads,
    train_run,
)

SAMPLE_IMAGES = 6
FOLDS_DIR = "folds"
"""Where each fold's weights land as it ends, so a failed fold loses only itself."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m search.final",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--config", type=Path, required=True, help="training config (YAML/JSON)")
    parser.add_argument("--data", type=Path, help="archive (default: the synthetic one)")
    parser.add_argument("--folds", type=int, help="train K models on K folds and ensemble them")
    parser.add_argument("--epochs", type=int, help="epochs (default: derived from the search)")
    parser.add_argument("--rerank", type=int, help="retrain the top N exported configs first")
    parser.add_argument("--rerank-seeds", type=int, default=2, help="seeds per reranked config")
    parser.add_argument("--out", type=Path, help="output folder (default: results/final/<name>)")
    parser.add_argument(
        "--threads", type=int, help="torch threads here (all-data model, test predictions)"
    )
    parser.add_argument("--workers", type=int, default=0, help="loader workers (online aug)")
    parser.add_argument(
        "--compress", action="store_true", help="write submission.csv.gz (~1 MB, not ~30 MB)"
    )
    parser.add_argument(
        "--no-calibration", action="store_true", help="--folds: no per-class decoding offsets"
    )
    add_resource_flags(parser, "fold or rerank run")
    add_decoding_flags(parser)
    return parser.parse_args(argv)


def final_epochs(config: TrainConfig, requested: int | None) -> tuple[int, str]:
    """Epochs for training on all data, and where the number came from."""
    if requested is not None:
        return requested, "--epochs"
    best = config.provenance.get("best_epoch")
    if best:
        epochs = max(1, math.ceil(best / (1 - config.val_fraction)))
        return epochs, f"search best epoch {best} / (1 - val_fraction {config.val_fraction:g})"
    return config.max_epochs, "the config's max_epochs (no search provenance)"


def training_only(archive: MarsArchive) -> MarsArchive:
    """The archive without its test set: what a training task needs in the object store."""
    return dataclasses.replace(archive, test_images=None)


def rerank(
    config_path: Path,
    n: int,
    seeds: int,
    archive: MarsArchive,
    *,
    cpus: float,
    gpus: float,
    workers: int = 0,
) -> TrainConfig:
    """Retrain the top-n exported configs with `seeds` seeds each; the best mean val mIoU wins.

    Each run scores on the split its seed draws, as the search's trials did.
    """
    candidates = sorted(config_path.parent.glob("top-*.yaml"))[:n]
    if not candidates:
        raise ConfigError(f"--rerank: no top-*.yaml configs beside {config_path}")
    configs = {path: TrainConfig.load(path) for path in candidates}
    data = ray.put(training_only(archive))
    remote = train_run.options(num_cpus=cpus, num_gpus=gpus)
    jobs = {}
    for path, config in configs.items():
        if not 0 < config.val_fraction < 1:
            raise ConfigError(f"--rerank: {path.name} has val_fraction {config.val_fraction:g}")
        for seed in range(seeds):
            split = train_val_split(archive.masks, config.val_fraction, seed)
            seeded = config.replace(seed=seed)
            jobs[(path, seed)] = remote.remote(seeded, data, split, task_threads(cpus), workers)
    scores: dict[Path, list[float]] = {path: [] for path in candidates}
    failures = []
    for (path, seed), row, reason in as_completed(jobs, desc="rerank"):
        if reason is not None:
            failures.append(f"rerank {path.name} seed {seed} failed: {reason}")
            tqdm.write(failures[-1])
            continue
        scores[path].append(row["val_miou"])
        tqdm.write(
            f"rerank {path.name} seed {seed}: val mIoU {row['val_miou']:.4f} "
            f"at epoch {row['best_epoch']}"
        )
    if failures:
        raise TaskError("; ".join(failures))
    best_config, best_mean = None, -math.inf
    for path, config in configs.items():
        mean = float(np.mean(scores[path]))
        spread = float(np.std(scores[path]))
        print(f"rerank {path.name}: val mIoU {mean:.4f} +- {spread:.4f} over {seeds} seeds")
        if mean > best_mean:
            best_config, best_mean = config, mean
    print(f"rerank: keeping {best_config.provenance.get('trial', '?')} (mean {best_mean:.4f})")
    return best_config


def train_fold(
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    *,
    threads: int,
    workers: int = 0,
    tta: bool = True,
) -> dict[str, Any]:
    """One fold (a Ray task): its best weights on the CPU, its history, and its out-of-fold
    probabilities (N_val, 5, H, W) float16, flip-averaged with `tta` as the test set will be."""
    data = prepare_data(config, archive, split=split)
    result = fit(config, data, num_threads=threads, workers=workers)
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


_train_fold = ray.remote(train_fold)


def decode_probabilities(
    probs: np.ndarray, *, metric_aware: bool, offsets: np.ndarray | None = None
) -> np.ndarray:
    """Labels (N, H, W) uint8 of probabilities (N, 5, H, W), a batch at a time, decoded as the
    submission is (`offsets` added to the log-probabilities first)."""
    out = np.empty((len(probs), *probs.shape[2:]), dtype=np.uint8)
    for start in range(0, len(probs), BATCH):
        chunk = torch.from_numpy(probs[start : start + BATCH].astype(np.float32))
        scores = chunk if offsets is None else apply_offsets(chunk, offsets)
        out[start : start + len(chunk)] = decode(scores, metric_aware=metric_aware).numpy()
    return out


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
) -> tuple[list[nn.Module], list[list[dict[str, Any]]], np.ndarray]:
    """K models on K stratified folds as Ray tasks, and the out-of-fold probabilities of every
    training image (each is in exactly one fold's validation set).

    Each fold is reported and saved to `folds_dir` as it ends; failed folds are named together
    once the others have finished.
    """
    plans = kfold_plans(archive.masks, folds, config.seed)
    data = ray.put(training_only(archive))  # one copy in the object store for every fold
    remote = _train_fold.options(num_cpus=cpus, num_gpus=gpus)
    threads = task_threads(cpus)
    jobs = {
        k: remote.remote(config, data, plan, threads=threads, workers=workers, tta=tta)
        for k, plan in enumerate(plans)
    }
    oof = np.zeros((len(archive), NUM_CLASSES, *archive.images.shape[1:]), dtype=np.float16)
    models: dict[int, nn.Module] = {}
    histories: dict[int, list[dict[str, Any]]] = {}
    failures = []
    folds_dir.mkdir(parents=True, exist_ok=True)
    for k, fold, reason in as_completed(jobs, desc="folds"):
        name = f"fold {k + 1}/{folds}"
        if reason is not None:
            failures.append(f"{name} failed: {reason}")
            tqdm.write(failures[-1])
            continue
        model = config.model.build()
        model.load_state_dict(fold["weights"])
        save_models(folds_dir / f"fold-{k + 1}.pt", config, [model])
        models[k], histories[k] = model.eval(), fold["history"]
        val = fold["val_idx"]
        oof[val] = fold["probs"]
        preds = decode_probabilities(fold["probs"], metric_aware=metric_aware)
        score = score_masks(preds, archive.masks[val]).mean_iou
        tqdm.write(f"{name}: best epoch {fold['best_epoch']}, val mIoU {score:.4f}")
    if failures:
        kept = f"{len(models)} finished fold(s) saved in {folds_dir}" if models else "none finished"
        raise TaskError("; ".join(failures) + f" ({kept}; no submission written)")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = TrainConfig.load(args.config)
    out = args.out or Path("results") / "final" / args.config.stem
    submission_path = out / ("submission.csv.gz" if args.compress else "submission.csv")
    check_target(submission_path, args.force)
    if args.folds is not None and args.folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {args.folds}")
    archive, report = load_clean_archive(args.data)
    require_test_set(archive)
    print(report.summary())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tta, metric_aware = not args.no_tta, not args.no_metric_aware
    tasks: dict[str, Any] = {}
    if args.folds or args.rerank:
        gpus = start_ray(args.address, args.cpus_per_trial, args.gpus_per_trial)
        tasks = {"cpus": args.cpus_per_trial, "gpus": gpus, "workers": args.workers}
        print(f"training runs as Ray tasks, {args.cpus_per_trial:g} CPU + {gpus:g} GPU each")
    if args.rerank:
        config = rerank(args.config, args.rerank, args.rerank_seeds, archive, **tasks)

    facts: dict[str, Any] = {"training images (cleaned)": len(archive)}
    calibration = None
    if args.folds:
        if args.epochs:
            config = config.replace(max_epochs=args.epochs)
        models, histories, oof = train_folds(
            config,
            archive,
            args.folds,
            out / FOLDS_DIR,
            tta=tta,
            metric_aware=metric_aware,
            **tasks,
        )
        calibrate = metric_aware and not args.no_calibration
        scores, calibration, preds = out_of_fold(
            oof, archive, metric_aware=metric_aware, calibrate=calibrate
        )
        chosen = slice(0, SAMPLE_IMAGES)
        samples = (archive.images[chosen], archive.masks[chosen], preds[chosen])
        facts["training"] = (
            f"{args.folds}-fold ensemble, early stopping per fold, up to {config.max_epochs} epochs"
        )
        label = f"out-of-fold ({args.folds} folds)" + (", calibrated" if calibration else "")
        if calibration is not None:
            facts["calibration"] = (
                f"per-class log-probability offsets fit on the out-of-fold probabilities: "
                f"{format_offsets(calibration.offsets)} (mIoU {calibration.gain:+.4f})"
            )
        elif args.no_calibration:
            facts["calibration"] = "off (--no-calibration)"
        else:
            facts["calibration"] = "off (offsets are fit for metric-aware decoding)"
    else:
        epochs, why = final_epochs(config, args.epochs)
        config = config.replace(val_fraction=0.0, max_epochs=epochs)
        print(f"training on all {len(archive)} images for {epochs} epochs ({why})")
        fit_args = {"device": device, "num_threads": args.threads, "workers": args.workers}
        result = fit(config, archive, **fit_args)
        models, histories, scores, samples = [result.model.cpu()], [result.history], None, None
        facts["training"] = f"one model on all data, {epochs} epochs ({why})"
        label = "held-out (none: trained on all data)"
        if "val_miou" in config.provenance:
            facts["search validation mIoU"] = config.provenance["val_miou"]
    facts["test-time augmentation"] = "horizontal flip" if tta else "off"
    facts["decoding"] = "metric-aware (classes 1-4)" if metric_aware else "plain argmax"

    out.mkdir(parents=True, exist_ok=True)
    offsets = calibration.offsets if calibration is not None else None
    submission = write_test_predictions(
        models,
        archive,
        submission_path,
        tta=tta,
        metric_aware=metric_aware,
        device=device,
        offsets=offsets,
    )
    model_path = save_models(out / "model.pt", config, models, offsets=offsets)
    command = "python -m search.final " + shlex.join(sys.argv[1:] if argv is None else argv)
    report_path = write_report(
        out,
        config=config,
        scores=scores,
        score_label=label,
        histories=histories,
        samples=samples,
        facts=facts,
        commands=[command],
        calibration=calibration,
    )
    print(f"wrote {submission}, {model_path} and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
