"""`python -m search.final`: train a chosen configuration for real and write the Kaggle submission.

    python -m search.final --config results/marsseg-1/best_config.yaml --data mars_for_students.npz
    python -m search.final --config results/marsseg-1/best_config.yaml --folds 5     # an ensemble
    python -m search.final --config results/marsseg-1/best_config.yaml --rerank 3    # robust pick

Without `--folds` it trains one model on all cleaned training data for a fixed number of epochs:
`--epochs`, or the search's best epoch scaled by 1 / (1 - val_fraction) (the final run sees that
much more data, so it overfits that much later). With `--folds K` it trains K models with early
stopping on K stratified folds, reports their out-of-fold mIoU, and averages their probabilities.
`--rerank N` first retrains the top-N exported configs (the `top-*.yaml` files beside `--config`)
with a few seeds and keeps the best mean score: one validation split is small and noisy.

The output folder gets `submission.csv` (`.csv.gz` with `--compress`), `model.pt` (every
member's weights and the config) and `report.md` with its PNGs.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive, kfold_plans, load_clean_archive
from marsseg.errors import ConfigError
from marsseg.metrics import ConfusionMeter, score_masks
from marsseg.predict import predict_masks, save_models
from marsseg.report import write_report
from marsseg.train import fit, prepare_data, resolve_device
from search.predict import (
    add_decoding_flags,
    check_target,
    require_test_set,
    write_test_predictions,
)

SAMPLE_IMAGES = 6


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
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--workers", type=int, default=0, help="loader workers (online aug)")
    parser.add_argument(
        "--compress", action="store_true", help="write submission.csv.gz (~1 MB, not ~30 MB)"
    )
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


def rerank(
    config_path: Path, n: int, seeds: int, archive: MarsArchive, **fit_args: Any
) -> TrainConfig:
    """Retrain the top-n exported configs with `seeds` seeds each; the best mean val mIoU wins."""
    candidates = sorted(config_path.parent.glob("top-*.yaml"))[:n]
    if not candidates:
        raise ConfigError(f"--rerank: no top-*.yaml configs beside {config_path}")
    best_config, best_mean = None, -math.inf
    for path in candidates:
        config = TrainConfig.load(path)
        scores = [fit(config.replace(seed=s), archive, **fit_args).best_score for s in range(seeds)]
        mean = float(np.mean(scores))
        print(f"rerank {path.name}: val mIoU {mean:.4f} +- {np.std(scores):.4f} over {seeds} seeds")
        if mean > best_mean:
            best_config, best_mean = config, mean
    print(f"rerank: keeping {best_config.provenance.get('trial', '?')} (mean {best_mean:.4f})")
    return best_config


def train_folds(
    config: TrainConfig,
    archive: MarsArchive,
    folds: int,
    *,
    tta: bool,
    metric_aware: bool,
    **fit_args: Any,
) -> tuple[list[nn.Module], list[list[dict[str, Any]]], Any, tuple[np.ndarray, ...]]:
    """K models on K stratified folds, scored out of fold with the test set's decoding."""
    models, histories = [], []
    meter = ConfusionMeter()
    samples = None
    for k, (train_idx, val_idx) in enumerate(kfold_plans(archive.masks, folds, config.seed)):
        data = prepare_data(config, archive, split=(train_idx, val_idx))
        result = fit(config, data, **fit_args)
        preds = predict_masks(
            [result.model],
            data.val_images,
            next(result.model.parameters()).device,
            tta=tta,
            metric_aware=metric_aware,
        )
        fold = score_masks(preds, data.val_masks)
        print(f"fold {k + 1}/{folds}: best epoch {result.best_epoch}, val mIoU {fold.mean_iou:.4f}")
        meter.update(torch.from_numpy(preds), torch.from_numpy(data.val_masks))
        models.append(result.model.cpu())
        histories.append(result.history)
        if samples is None:
            chosen = slice(0, SAMPLE_IMAGES)
            samples = (data.val_images[chosen], data.val_masks[chosen], preds[chosen])
    return models, histories, meter.compute(), samples


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
    device = resolve_device(args.device)
    fit_args = {"device": device, "num_threads": args.threads, "workers": args.workers}
    tta, metric_aware = not args.no_tta, not args.no_metric_aware
    if args.rerank:
        config = rerank(args.config, args.rerank, args.rerank_seeds, archive, **fit_args)

    facts: dict[str, Any] = {"training images (cleaned)": len(archive)}
    if args.folds:
        if args.epochs:
            config = config.replace(max_epochs=args.epochs)
        models, histories, scores, samples = train_folds(
            config, archive, args.folds, tta=tta, metric_aware=metric_aware, **fit_args
        )
        facts["training"] = (
            f"{args.folds}-fold ensemble, early stopping per fold, up to {config.max_epochs} epochs"
        )
        label = f"out-of-fold ({args.folds} folds)"
        print(f"out-of-fold mIoU {scores.mean_iou:.4f}")
    else:
        epochs, why = final_epochs(config, args.epochs)
        config = config.replace(val_fraction=0.0, max_epochs=epochs)
        print(f"training on all {len(archive)} images for {epochs} epochs ({why})")
        result = fit(config, archive, **fit_args)
        models, histories, scores, samples = [result.model.cpu()], [result.history], None, None
        facts["training"] = f"one model on all data, {epochs} epochs ({why})"
        label = "held-out (none: trained on all data)"
        if "val_miou" in config.provenance:
            facts["search validation mIoU"] = config.provenance["val_miou"]
    facts["test-time augmentation"] = "horizontal flip" if tta else "off"
    facts["decoding"] = "metric-aware (classes 1-4)" if metric_aware else "plain argmax"

    out.mkdir(parents=True, exist_ok=True)
    submission = write_test_predictions(
        models, archive, submission_path, tta=tta, metric_aware=metric_aware, device=device
    )
    model_path = save_models(out / "model.pt", config, models)
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
    )
    print(f"wrote {submission}, {model_path} and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
