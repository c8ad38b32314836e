"""What every benchmark shares: a description of the machine and one JSON file per run.

Each script prints a Markdown table (what `docs/performance.md` quotes) and writes the same
figures, with the machine and the command line, to `results/benchmarks/<name>-<device>.json`,
so a CPU run and a GPU run of one benchmark sit side by side and anyone can rerun either.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path("results") / "benchmarks"


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """The hardware and software a figure was measured on."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    return info


def device_label(device: torch.device | None) -> str:
    """A short file-name label: 'cpu', or the GPU's model ('nvidia-h100-80gb-hbm3')."""
    if device is None or device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).lower().replace(" ", "-")


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    *,
    device: torch.device | None = None,
    tag: str = "",
    **extra: Any,
) -> Path:
    """Write the rows with the machine and the command to results/benchmarks/, and say where.

    `tag` names a variant (`bf16-compile`), so runs that pull different levers on one device
    sit beside each other instead of overwriting one file."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-{device_label(device)}{'-' + tag if tag else ''}.json"
    payload = {
        "benchmark": name,
        "command": "python -m benchmarks." + name + " " + shlex.join(sys.argv[1:]),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(device),
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """`rows` as a Markdown table; `columns` maps each key to its header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(key)) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
