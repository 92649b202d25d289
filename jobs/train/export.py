"""The exported model rebuilt: where a run's export lands, and the module built from it.

The export format (file names, ``model.json``, writing and reading) is :mod:`pipelines.exports`.
:func:`load_exported_model` calls ``builder(preset, **kwargs)`` (only factories inside the ``rae``
package are allowed) and loads the weights with ``strict=True``.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from pipelines.exports import read_export


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def export_url(storage: str, run_name: str) -> str:
    """Where ``rae train ... --run NAME --storage URL`` writes its export."""
    return join_url(storage, run_name, "export")


def _resolve_builder(spec: str):
    module_name, _, function = spec.partition(":")
    if not (module_name == "rae" or module_name.startswith("rae.")) or not function:
        raise ValueError(f"export builder {spec!r}: expected 'rae.<module>:<factory>'")
    return getattr(importlib.import_module(module_name), function)


def load_exported_model(url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported model, load its EMA weights (strict), eval mode; return it and its
    config."""
    state_dict, config = read_export(url)
    model = _resolve_builder(config["builder"])(config["preset"], **config["kwargs"])
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), config
