"""Segmentation models built from scratch, behind one registry.

    model = build_model("marsseg", width=0.25)   # (B, 1, H, W) -> (B, 5, H, W) logits
    for knob in model_knobs("marsseg"): ...      # what a search space samples

Each architecture lives in its own module and registers itself with `@register_model`. Importing
this package imports every public module in it, so a new architecture joins by adding a module;
nothing here or in the search code names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from marsseg.models.knobs import Knob
from marsseg.models.registry import build_model, list_models, model_knobs, register_model

__all__ = ["Knob", "build_model", "list_models", "model_knobs", "register_model"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
