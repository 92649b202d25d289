"""`rae train dit`: DiT^DH flow matching on a latent store, FSDP2 on Ray Train.

Each worker reads its share of the store itself (:class:`pipelines.store_batches.StoreBatches`:
pyarrow, no Ray Data; float16 latents as stored and labels, equal shares across workers; the step
normalizes them on the training device with the store's statistics, placed there once), takes
``rows // global_batch`` steps per epoch on every rank, and hands the model-specific part (build, shard units, loss) to the shared
scaffold. The store decides the latent space: the model's grid and channels come from its
latent spec, which the export copies verbatim (with the store's normalization statistics).

Data order: the store's row groups in an order drawn from (seed, epoch), the same on every rank,
cut into one contiguous share per rank, whose rows a local shuffle buffer seeded by (seed, epoch,
rank) mixes; so a resumed run sees exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from jobs.train.launch import check_batch_fits, check_run_length, train_task
from jobs.train.lr_schedule import LRSchedule
from jobs.train.loop import BatchSource, LoopConfig, OptimConfig, RunContext, SingleModelTask
from pipelines import latent_store, storage
from pipelines.exports import write_export
from pipelines.store_batches import StoreBatches, StoreRows
from rae.dit import build_dit
from rae.latent_spec import LatentSpec
from rae.normalization import LatentStats
from rae.transport import TransportConfig, training_loss


@dataclass
class DiTRunConfig:
    """Defaults: the paper's DiT^DH-XL run (global batch 1024, 2e-4 held 40 epochs then linear to
    2e-5 at epoch 800, EMA 0.9995, grad clip 1.0, AdamW betas (0.9, 0.95), no weight decay)."""

    store: str = ""
    model: str = "ditdh-xl"
    model_overrides: dict = field(default_factory=dict)
    ema_decay: float = 0.9995
    time_distribution: str = "logit_normal"
    views: tuple = ()  # () = every view the store holds; (0,) = originals only
    num_classes: int | None = None  # None: the store's class names, else its largest label + 1
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=800, global_batch_size=1024,
                                                                max_micro_batch=64, shuffle_buffer=4096))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(schedule=LRSchedule(
        kind="constant_linear", base_lr=2e-4, final_lr=2e-5, hold_epochs=40, decay_end_epoch=800)))


@dataclass(frozen=True)
class StoreFacts:
    """What the run needs to know about the store (read once on the driver)."""

    url: str
    rows: int
    num_classes: int
    latent_spec: LatentSpec  # the store's, verbatim: the model's grid and channels, copied into the export


def store_facts(manifest: dict, config: DiTRunConfig, url: str) -> StoreFacts:
    """The store's latent spec, classes and row count for this run. The classes: ``config.num_classes``
    (at least the store's largest label + 1), else the store's class names (``classes.json``), else
    its largest label + 1 (shards made elsewhere carry integer labels and no class file)."""
    spec = latent_store.latent_spec(manifest, url)
    num_classes = class_count(manifest, config.num_classes, url)
    rows = int(manifest["images"]) * len(config.views) if config.views else int(manifest["rows"])
    return StoreFacts(url=url, rows=rows, num_classes=int(num_classes), latent_spec=spec)


def class_count(manifest: dict, asked: int | None, url: str) -> int:
    """The DiT's number of classes for a store (see :func:`store_facts`); a count that leaves a
    stored label out is refused."""
    largest = (manifest.get("labels") or {}).get("max")
    if asked is not None:
        if asked < 1:
            raise ValueError(f"num_classes must be positive, got {asked}")
        if largest is not None and asked <= largest:
            raise ValueError(f"num_classes {asked} is too small for store {url}: its labels go up to {largest}; "
                             f"pass --num-classes {largest + 1} or more (or leave it unset)")
        return asked
    if manifest.get("num_classes"):
        return int(manifest["num_classes"])
    if largest is None:
        raise ValueError(f"store {url} records neither class names nor its label range (encoded by an older "
                         f"rae); pass --num-classes N, or re-encode it with `rae encode` into a new store")
    return int(largest) + 1


def write_self_contained_export(url: str, weights: dict, meta: dict, facts: StoreFacts) -> None:
    """The export plus what sampling needs without the store: a copy of the store's normalization
    statistics, under the name its latent spec (copied into model.json) gives them."""
    source_fs, source_root = storage.resolve(facts.url)
    target_fs, target_root = storage.resolve(url)
    name = facts.latent_spec.stats
    storage.write_bytes(target_fs, storage.join(target_root, name),
                        source_fs.cat_file(storage.join(source_root, name)))
    write_export(url, weights, meta)


class DiTTask(SingleModelTask):
    """The DiT^DH model, its FSDP2 units (trunk blocks, and the DDT head's blocks as their own
    units) and the flow-matching loss; the export carries the store's statistics with it.

    With ``stats`` the batches are the store's rows as stored (float16) and each step normalizes them
    on its device; without, they arrive normalized. With ``rows`` (the store's row groups) each
    worker reads its own share (:meth:`batch_source`); without, the run's ``train`` Ray Dataset."""

    columns = ("latent", "label")

    def __init__(self, config: DiTRunConfig, facts: StoreFacts, stats: LatentStats | None = None,
                 rows: StoreRows | None = None) -> None:
        super().__init__(config.optim, config.ema_decay)
        self.config, self.facts, self.stats, self.rows = config, facts, stats, rows
        self.transport = TransportConfig(time_distribution=config.time_distribution)

    def batch_source(self, loop: LoopConfig, rank: int, world: int) -> BatchSource | None:
        if self.rows is None:
            return None
        return StoreBatches(self.rows, rank=rank, world=world, seed=loop.seed, shuffle_buffer=loop.shuffle_buffer)

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.normalize = self.stats.normalizer(ctx.device) if self.stats is not None else None

    def build_kwargs(self) -> dict[str, Any]:
        spec = self.facts.latent_spec
        return dict(latent_channels=spec.channels, grid=spec.grid, num_classes=self.facts.num_classes,
                    **self.config.model_overrides)

    def build_model(self) -> nn.Module:
        return build_dit(self.config.model, **self.build_kwargs())

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return [*model.blocks, *getattr(model, "head_blocks", [])]

    def per_sample_loss(self, model: nn.Module, batch) -> Any:
        latent = self.normalize(batch["latent"]) if self.normalize is not None else batch["latent"]
        return training_loss(model, latent, batch["label"], config=self.transport)

    def export_config(self) -> dict[str, Any]:
        return {"kind": "dit", "builder": "rae.dit:build_dit", "preset": self.config.model,
                "kwargs": self.build_kwargs(), "latent_spec": self.facts.latent_spec.to_dict(),
                "store": self.facts.url, "ema_decay": self.config.ema_decay}

    def write_export(self, url: str, weights: dict, meta: dict) -> None:
        write_self_contained_export(url, weights, meta, self.facts)


def train_dit(config: DiTRunConfig, *, run_name: str, storage: str, **launch_options: Any):
    """Read the store's facts and check the model fits them, then train (or resume ``run_name``);
    returns Ray's Result. The EMA export lands in ``<storage>/<run_name>/export``. ``launch_options``
    (num_workers, device, max_failures, gpu_wait_s, ...) go to :func:`jobs.train.launch.launch`."""
    from pipelines.store_batches import store_rows
    from pipelines.store_reader import open_store

    if not config.store:
        raise ValueError("no latent store given: pass --store URL (or store: in the config)")
    check_run_length(config.loop)
    store = open_store(config.store)
    facts = store_facts(store.manifest, config, config.store)
    check_batch_fits(config.loop, facts.rows, f"the rows of store {config.store}")
    task = DiTTask(config, facts, store.stats, store_rows(store, views=config.views or None))
    with torch.device("meta"):  # refuse a bad model config (e.g. too narrow) before launching anything
        task.build_model()
    return train_task(task, config.loop, rows=facts.rows, run_config=dataclasses.asdict(config), run_name=run_name,
                      storage=storage, **launch_options)
