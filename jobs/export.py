"""The exported model: consolidated EMA weights (safetensors) plus the JSON that rebuilds the model.

A training checkpoint is sharded (DCP) and holds optimizer state; sampling and evaluation want one
file of weights and how to build the module. ``<run>/export/`` holds:

    model.safetensors   full, unsharded fp32 EMA weights (metadata: run, step)
    model.json          {"format": 1, "kind", "builder": "rae.<module>:<factory>", "preset",
                         "kwargs": {...}, "run", "step", ...}

:func:`load_exported_model` calls ``builder(preset, **kwargs)`` (only factories inside the ``rae``
package are allowed) and loads the weights with ``strict=True``.
"""
from __future__ import annotations

import importlib
import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

EXPORT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
HISTORY_FILE = "history.json"  # [{step, loss, lr, ...}] as logged, for loss curves


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def export_url(storage: str, run_name: str) -> str:
    """Where ``rae train ... --run NAME --storage URL`` writes its export."""
    return join_url(storage, run_name, "export")


def write_export(url: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write weights and config to the folder ``url`` (any fsspec URL or local path)."""
    for key in ("kind", "builder", "preset", "kwargs"):
        if key not in config:
            raise ValueError(f"export config lacks {key!r}; got keys {sorted(config)}")
    config = dict(config, format=EXPORT_FORMAT)
    history = config.pop("history", None)  # the run's logged metrics: a file of their own
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {"run": str(config.get("run", "")), "step": str(config.get("step", ""))}
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join_url(root, WEIGHTS_FILE), "wb") as handle:
        handle.write(save_safetensors(tensors, metadata=metadata))
    with fs.open(join_url(root, CONFIG_FILE), "w") as handle:
        json.dump(config, handle, indent=1, sort_keys=True)
    if history is not None:
        with fs.open(join_url(root, HISTORY_FILE), "w") as handle:
            json.dump(history, handle)


def read_export(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config) from an export folder."""
    fs, root = fsspec.core.url_to_fs(url)
    config_path, weights_path = join_url(root, CONFIG_FILE), join_url(root, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not fs.exists(path):
            raise FileNotFoundError(f"export {url}: {path.rsplit('/', 1)[-1]} is missing; expected "
                                    f"{WEIGHTS_FILE} and {CONFIG_FILE} written by `rae train`")
    with fs.open(config_path, "r") as handle:
        config = json.load(handle)
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"export {url}: format {config.get('format')!r}, this version reads "
                         f"{EXPORT_FORMAT}")
    with fs.open(weights_path, "rb") as handle:
        state_dict = load_safetensors(handle.read())
    return state_dict, config


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
