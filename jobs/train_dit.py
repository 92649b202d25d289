"""`rae train dit`: DiT^DH flow matching on a latent store, FSDP2 on Ray Train.

The train function reads the store through ``ray.train.get_dataset_shard("train")`` (normalized
latents and labels, split equally across workers), takes ``rows // global_batch`` steps per epoch
on every rank, and hands the model-specific part (build, shard units, loss) to the shared
scaffold. Before anything is launched, the store's encoder and latent shape are checked against
the run's config; a mismatch is refused with both sides named.

Data order: the store's part order is fixed (no per-execution file shuffle) and rows are mixed by
a local shuffle buffer seeded by (seed, epoch, rank), so a resumed run sees exactly the batches
the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import nn

from jobs.export import export_url, write_export
from jobs.launch import absolute_storage, launch
from jobs.lr_schedule import LRSchedule
from jobs.train_scaffold import LoopConfig, OptimConfig, SingleModelTask, fit, ray_shard_batches
from rae.dit import build_dit
from rae.encoders import DEFAULT_ENCODER, ENCODER_PRESETS
from rae.transport import TransportConfig, training_loss


@dataclass
class DiTRunConfig:
    """Defaults: the paper's DiT^DH-XL run (global batch 1024, 2e-4 held 40 epochs then linear to
    2e-5 at epoch 800, EMA 0.9995, grad clip 1.0, AdamW betas (0.9, 0.95), no weight decay)."""

    store: str = ""
    model: str = "ditdh-xl"
    encoder: str = DEFAULT_ENCODER
    encoder_input_size: int = 0  # 0: the encoder preset's input size
    model_overrides: dict = field(default_factory=dict)
    ema_decay: float = 0.9995
    time_distribution: str = "logit_normal"
    views: tuple = ()  # () = every view the store holds; (0,) = originals only
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=800, global_batch_size=1024,
                                                                max_micro_batch=64, shuffle_buffer=4096))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(schedule=LRSchedule(
        kind="constant_linear", base_lr=2e-4, final_lr=2e-5, hold_epochs=40, decay_end_epoch=800)))


@dataclass(frozen=True)
class StoreFacts:
    """What the run needs to know about the store (read once on the driver)."""

    url: str
    rows: int
    grid: int
    channels: int
    num_classes: int
    encoder: dict = field(default_factory=dict)  # the store's encoder facts (name, digest, input size, grid, ...)
    stats_path: str = ""                          # the store's normalization statistics, relative to its URL


LATENT_STATS_FILE = "latent_stats.safetensors"


def check_store_matches(manifest: dict, config: DiTRunConfig, url: str) -> StoreFacts:
    """Refuse a store encoded with another encoder or latent shape than the run is configured for."""
    if config.encoder not in ENCODER_PRESETS:
        raise ValueError(f"encoder={config.encoder!r} is not a known encoder; choose one of "
                         f"{sorted(ENCODER_PRESETS)}")
    spec = ENCODER_PRESETS[config.encoder]
    if config.encoder_input_size:
        spec = spec.with_input_size(config.encoder_input_size)
    want = (config.encoder, tuple(spec.latent_shape))
    have_encoder = manifest.get("encoder", {}).get("name")
    have_shape = tuple(int(v) for v in manifest["latent"]["shape"])
    if (have_encoder, have_shape) != want:
        raise ValueError(
            f"store {url} was encoded with {have_encoder} giving latents of {have_shape[0]} tokens x "
            f"{have_shape[1]} channels; this run is configured for {want[0]} giving {want[1][0]} x "
            f"{want[1][1]}. Set encoder= (and encoder_input_size=) to match the store, or use a store "
            f"encoded for this run")
    num_classes = manifest.get("num_classes")
    if not num_classes:
        raise ValueError(f"store {url} records no classes (num_classes); a class-conditional DiT "
                         f"needs labelled data")
    rows = int(manifest["images"]) * len(config.views) if config.views else int(manifest["rows"])
    return StoreFacts(url=url, rows=rows, grid=spec.grid, channels=spec.channels,
                      num_classes=int(num_classes), encoder=dict(manifest.get("encoder", {})),
                      stats_path=manifest.get("stats", {}).get("path", ""))


def write_self_contained_export(url: str, weights: dict, meta: dict, facts: StoreFacts) -> None:
    """The export plus what sampling needs without the store: a copy of the store's normalization
    statistics (named by ``latent_stats`` in model.json) and its encoder facts (``encoder_spec``)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    if facts.stats_path:
        with fsspec.open(f"{facts.url.rstrip('/')}/{facts.stats_path}", "rb") as handle:
            fs.pipe_file(f"{root.rstrip('/')}/{LATENT_STATS_FILE}", handle.read())
        meta = dict(meta, latent_stats=LATENT_STATS_FILE)
    write_export(url, weights, dict(meta, encoder_spec=facts.encoder,
                                    latent_shape=[facts.grid * facts.grid, facts.channels]))


class DiTTask(SingleModelTask):
    """The DiT^DH model, its FSDP2 units (trunk blocks, and the DDT head's blocks as their own
    units) and the flow-matching loss."""

    def __init__(self, config: DiTRunConfig, facts: StoreFacts) -> None:
        super().__init__(config.optim, config.ema_decay)
        self.config, self.facts = config, facts
        self.transport = TransportConfig(time_distribution=config.time_distribution)

    def build_kwargs(self) -> dict[str, Any]:
        return dict(latent_channels=self.facts.channels, grid=self.facts.grid,
                    num_classes=self.facts.num_classes, **self.config.model_overrides)

    def build_model(self) -> nn.Module:
        return build_dit(self.config.model, **self.build_kwargs())

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return [*model.blocks, *getattr(model, "head_blocks", [])]

    def per_sample_loss(self, model: nn.Module, batch) -> Any:
        return training_loss(model, batch["latent"], batch["label"], config=self.transport)

    def export_config(self) -> dict[str, Any]:
        return {"kind": "dit", "builder": "rae.dit:build_dit", "preset": self.config.model,
                "kwargs": self.build_kwargs(), "encoder": self.config.encoder, "store": self.facts.url,
                "ema_decay": self.config.ema_decay}


def _train_fn(payload: dict) -> None:
    import ray.train

    config: DiTRunConfig = payload["config"]
    facts: StoreFacts = payload["facts"]
    rank = ray.train.get_context().get_world_rank()
    target = payload["export_url"]
    fit(DiTTask(config, facts), config.loop, run_name=payload["run_name"], rows=facts.rows,
        batches=ray_shard_batches("train", ["latent", "label"], config.loop.shuffle_buffer,
                                  config.loop.seed, rank),
        run_config=dataclasses.asdict(config),
        export=lambda weights, meta: write_self_contained_export(target, weights, meta, facts))


def train_dit(config: DiTRunConfig, *, run_name: str, storage: str, num_workers: int | tuple[int, int],
              max_failures: int = 3, cpus_per_worker: float | None = None):
    """Check the store against the config, then train (or resume ``run_name``); returns Ray's Result.
    The EMA export lands in ``<storage>/<run_name>/export``."""
    from pipelines.store_reader import latent_dataset, open_store

    if not config.store:
        raise ValueError("no latent store given: pass --store URL (or store: in the config)")
    store = open_store(config.store)
    facts = check_store_matches(store.manifest, config, config.store)
    with torch.device("meta"):  # refuse a bad model config (e.g. too narrow) before launching anything
        build_dit(config.model, latent_channels=facts.channels, grid=facts.grid,
                  num_classes=facts.num_classes, **config.model_overrides)
    dataset = latent_dataset(config.store, views=config.views or None, shuffle_files=False)
    payload = {"config": config, "facts": facts, "run_name": run_name,
               "export_url": export_url(absolute_storage(storage), run_name)}
    return launch(_train_fn, payload, run_name=run_name, storage=storage, num_workers=num_workers,
                  datasets={"train": dataset}, keep_checkpoints=config.loop.keep_checkpoints,
                  max_failures=max_failures, cpus_per_worker=cpus_per_worker)
