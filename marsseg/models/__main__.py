"""Print a Markdown table of the registered architectures at their default knobs.

Columns: parameters, forward GFLOPs for one image (counted by `torch.utils.flop_counter`, which
counts convolutions, matrix products and attention, i.e. 2 FLOPs per multiply-accumulate, and
ignores cheap element-wise ops), and median CPU latency of one forward pass of a batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from marsseg.classes import IMAGE_SHAPE
from marsseg.cli import COUNT, ArgumentParser, command, program
from marsseg.models import build_model, list_models


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.inference_mode()
def forward_flops(model: nn.Module, shape: Sequence[int] = (1, 1, *IMAGE_SHAPE)) -> int:
    """FLOPs of one forward pass on a zero tensor of `shape`, in eval mode."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return counter.get_total_flops()


@torch.inference_mode()
def cpu_latency(model: nn.Module, batch_size: int, repeats: int) -> float:
    """Median seconds of one eval-mode forward pass of `batch_size` images, after one warm-up."""
    model.eval()
    x = torch.rand(batch_size, 1, *IMAGE_SHAPE)
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(names: Sequence[str], batch_size: int, repeats: int) -> str:
    """The Markdown table, one row per architecture in `names`."""
    h, w = IMAGE_SHAPE
    rows = [
        f"| architecture | parameters | GFLOPs (1x1x{h}x{w}) | CPU latency, batch {batch_size} |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        model = build_model(name)
        params = count_parameters(model) / 1e6
        gflops = forward_flops(model) / 1e9
        latency_ms = cpu_latency(model, batch_size, repeats) * 1e3
        rows.append(f"| {name} | {params:.2f}M | {gflops:.2f} | {latency_ms:.0f} ms |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("marsseg.models", "marsseg-models"), description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list_models(),
        default=list_models(),
        metavar="NAME",
        help=f"architectures to profile (default: all of {', '.join(list_models())})",
    )
    parser.add_argument("--batch-size", type=COUNT, default=32, help="latency batch (default 32)")
    parser.add_argument("--repeats", type=COUNT, default=5, help="timed passes (default 5)")
    parser.add_argument("--threads", type=COUNT, help="torch CPU threads (default: torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(table(args.models, args.batch_size, args.repeats))
    print(f"\nCPU: {torch.get_num_threads()} threads, torch {torch.__version__}; default knobs.")
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
