"""The export format: a trained model's consolidated EMA weights and the JSON that rebuilds it.

A training checkpoint is sharded (DCP) and holds optimizer state; sampling and evaluation want one
file of weights and how to build the module. An export folder (``<run>/export/``) holds:

    model.safetensors   full, unsharded fp32 EMA weights (metadata: run, step)
    model.json          {"format": 3, "kind", "builder": "rae.<module>:<factory>", "preset",
                         "kwargs": {...}, "latent_spec": {...}, "run", "step", ...}
    history.json        the run's logged metrics [{step, loss, lr, ...}], for loss curves
    stats.safetensors   (DiT exports) the store's normalization statistics, named by latent_spec.stats

``latent_spec`` is the :class:`rae.latent_spec.LatentSpec` of the latents the model was trained on,
copied verbatim from the store (DiT) or from the encoder (decoder). Writing and reading live here,
in ``pipelines``, so the sampling job reads exports without the ``jobs`` package; building the
module from the weights is ``jobs.train.export.load_exported_model``.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipelines import storage
from rae.latent_spec import LatentSpec
from rae.normalization import LatentStats

# 3: the models compute what the official RAE code computes (position table column-first, the decoder's
#    CLS token, DiT^DH's SiLU condition): format-2 weights give other outputs under this code.
# 2: the latent space is one `latent_spec` (1 had `encoder`/`encoder_spec`/`latent_shape`).
EXPORT_FORMAT = 3
_FORMAT_CHANGES = {2: "its models predate official parity (positions, the decoder's CLS token, DiT^DH's condition); "
                      "they would give other outputs under this version: retrain, or import official weights "
                      "with `rae import`",
                   1: "the latent space recorded as one latent_spec; re-export it from its run"}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
HISTORY_FILE = "history.json"
REQUIRED_KEYS = ("kind", "builder", "preset", "kwargs", "latent_spec")


def write_export(url: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write weights and config to the folder ``url`` (any fsspec URL or local path)."""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ValueError(f"export config lacks {key!r}; got keys {sorted(config)}")
    _check_kwargs_fit_spec(config["kwargs"], LatentSpec.from_dict(config["latent_spec"], f"export {url}"), url)
    config = dict(config, format=EXPORT_FORMAT)
    history = config.pop("history", None)  # the run's logged metrics: a file of their own
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {"run": str(config.get("run", "")), "step": str(config.get("step", ""))}
    fs, root = storage.resolve(url)
    storage.write_bytes(fs, storage.join(root, WEIGHTS_FILE), save_safetensors(tensors, metadata=metadata))
    storage.write_bytes(fs, storage.join(root, CONFIG_FILE), json.dumps(config, indent=1, sort_keys=True).encode())
    if history is not None:
        storage.write_bytes(fs, storage.join(root, HISTORY_FILE), json.dumps(history).encode())


def _check_kwargs_fit_spec(kwargs: dict, spec: LatentSpec, url: str) -> None:
    """The builder's latent grid and channels, where it takes them, are the spec's."""
    for key, value in (("grid", spec.grid), ("latent_channels", spec.channels)):
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"export {url}: kwargs {key}={kwargs[key]} but the latent spec has {value}")


def read_export(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config) from an export folder."""
    facts = read_export_facts(url)
    fs, root = storage.resolve(url)
    return load_safetensors(fs.cat_file(storage.join(root, WEIGHTS_FILE))), facts.config


@dataclass(frozen=True)
class ExportFacts:
    """What the driver knows about one export without loading its weights."""

    url: str
    config: dict
    digest: str  # sha256 of model.json and the weights file size: changes when either changes
    latent_spec: LatentSpec

    @property
    def kwargs(self) -> dict:
        return self.config["kwargs"]


def read_export_facts(url: str, kind: str | None = None) -> ExportFacts:
    """Read ``model.json`` of the export at ``url``; refuse another format version, or another ``kind``
    ("dit" or "decoder") when one is asked for."""
    what = f"--{kind} {url}" if kind else f"export {url}"
    fs, root = storage.resolve(url)
    config_path, weights_path = storage.join(root, CONFIG_FILE), storage.join(root, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not storage.exists(fs, path):
            raise FileNotFoundError(f"{what}: {path.rsplit('/', 1)[-1]} is missing; expected an export folder "
                                    f"({CONFIG_FILE} + {WEIGHTS_FILE}) written by `rae train {kind or '...'}`")
    text = fs.cat_file(config_path)
    config = json.loads(text)
    if config.get("format") != EXPORT_FORMAT:
        why = _FORMAT_CHANGES.get(config.get("format"), "re-export it from its run, or retrain")
        raise ValueError(f"{what}: export format {config.get('format')!r}, this version of rae reads "
                         f"{EXPORT_FORMAT}: {why}")
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"{what} is a {config.get('kind')!r} export; expected a {kind!r} export")
    digest = hashlib.sha256(text + str(fs.info(weights_path)["size"]).encode()).hexdigest()
    return ExportFacts(url, config, digest, LatentSpec.from_dict(config.get("latent_spec"), f"{what} ({CONFIG_FILE})"))


def load_latent_stats(dit: ExportFacts) -> LatentStats:
    """The normalization statistics that travel with a DiT export (``latent_spec.stats`` names the file)."""
    spec = dit.latent_spec
    if not spec.stats:
        raise ValueError(f"DiT export {dit.url} carries no latent statistics (its latent_spec names none); "
                         f"re-export it from its run")
    fs, root = storage.resolve(dit.url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / spec.stats
        path.write_bytes(fs.cat_file(storage.join(root, spec.stats)))
        stats = LatentStats.load(path)
    if stats.shape != spec.shape:
        raise ValueError(f"DiT export {dit.url}: statistics of shape {stats.shape} for latents of {spec.shape}")
    return stats
