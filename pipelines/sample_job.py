"""`rae sample`: class-conditional samples from an exported DiT^DH + decoder, as a Ray Data job.

The job is a fixed list of items (index, class, seed) cut into parts of ``part_size`` items. One
row per missing part goes through a pool of sampler actors (one GPU each when the cluster has
GPUs, CPU otherwise); each part is written atomically as ``parts/<start>-<stop>.npz``, so a rerun
of the same command samples exactly the parts that are missing. The last step streams the parts,
in item order, into the ADM evaluation suite's ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3) and,
as ADM's own sampler writes, ``arr_1`` the labels).

Layout under ``out``::

    sampling.json          the settings that determine the images (refused if a rerun differs), status
    parts/<start>-<stop>.npz   images, labels, item indices and seeds of one part
    png/<index>.png        each image (with --png)
    samples.npz            the ADM sample batch

Determinism: an item's noise is drawn from its own generator (``item_seed``) and items are always
sampled in the same batches (``batch_size`` consecutive indices; parts are whole batches), so a
rerun, a resumed job or another worker count gives bit-identical images. Another batch size changes
only floating-point rounding (the model's kernels depend on the batch shape), so it is a recorded
setting too.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
from PIL import Image

from pipelines import storage
from pipelines.actor_pool import plan_actor_pool, run_through_pool
from pipelines.cluster_capacity import parse_count_range
from pipelines.exports import ExportFacts, load_latent_stats, read_export_facts
from pipelines.sample_models import PRECISIONS, Guidance, ImageSampler, Loader, item_seed
from rae.devices import check_device_choice, pick_device
from rae.latent_spec import check_same_latents
from rae.sampling import SamplerConfig

FORMAT = "rae-samples"
FORMAT_VERSION = 1
SETTINGS = "sampling.json"
PARTS_DIR = "parts"
PNG_DIR = "png"
SAMPLES = "samples.npz"
PAPER_SAMPLES = 50_000
_PART_RE = re.compile(r"^(\d{8})-(\d{8})\.npz$")


@dataclass(frozen=True)
class SampleConfig:
    """Defaults: the paper's evaluation sampling (50k class-balanced samples, Euler 50 steps, fp32)."""

    dit: str
    decoder: str
    out: str
    num_samples: int = PAPER_SAMPLES
    classes: tuple[int, ...] | None = None  # None: every class of the DiT
    labels: str = "balanced"                # "balanced": classes in turn; "random": drawn with `seed`
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    guide: str | None = None
    guide_scale: float = 1.0
    seed: int = 0
    batch_size: int = 32
    part_size: int = 0                      # images per output part, whole batches; 0: about 1024
    precision: str = "tf32"                 # tf32 (fp32 with TF32 matmuls, the official sampler's) | fp32 | bf16 (costs FID: 1.13 -> 1.26 reported)
    png: bool = False
    npz: bool = True
    num_actors: int | tuple[int, int] | None = None  # N or (MIN, MAX); None: 1..GPUs the cluster can have (1 on CPU)
    device: str = "auto"                    # auto | gpu | cpu
    gpu_wait_s: float = 120.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.labels not in ("balanced", "random"):
            raise ValueError(f"labels must be 'balanced' or 'random', got {self.labels!r}")
        if self.part_size == 0 and self.batch_size >= 1:
            object.__setattr__(self, "part_size", self.batch_size * max(1, 1024 // self.batch_size))
        if self.batch_size < 1 or self.part_size < 1 or self.part_size % self.batch_size:
            raise ValueError(f"part size {self.part_size} must be a positive multiple of --batch-size "
                             f"{self.batch_size} (parts hold whole batches)")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"--seed must be in [0, 2**31), got {self.seed}")
        if self.guide is not None and self.cfg_scale != 1.0:
            raise ValueError("choose one guidance: --cfg-scale (classifier-free) or --guide (AutoGuidance)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_device_choice(self.device)
        if self.num_actors is not None:
            object.__setattr__(self, "num_actors", parse_count_range(self.num_actors, "num_actors"))
        if not (self.png or self.npz):
            raise ValueError("nothing to write: keep samples.npz (drop --no-npz) or add --png")


@dataclass
class SampleResult:
    out: str
    num_samples: int
    parts: int
    sampled_parts: int      # parts this call sampled (0 when everything was already there)
    samples_npz: str | None
    settings: dict


# ---------------------------------------------------------------- the plan

def plan_labels(config: SampleConfig, num_classes: int) -> np.ndarray:
    """The class of every item: classes in turn (balanced; any prefix is as balanced as it can be),
    or uniformly at random from a generator seeded with ``seed``."""
    classes = np.arange(num_classes) if config.classes is None else np.asarray(config.classes, np.int64)
    if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"--classes {classes.tolist()[:8]} must be non-empty and in [0, {num_classes}) for this DiT")
    if config.labels == "balanced":
        return classes[np.arange(config.num_samples) % len(classes)]
    return np.random.default_rng(config.seed).choice(classes, size=config.num_samples)


def plan_parts(num_samples: int, part_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + part_size, num_samples)) for start in range(0, num_samples, part_size)]


def part_name(start: int, stop: int) -> str:
    return f"{start:08d}-{stop:08d}.npz"


def done_parts(out: str) -> set[tuple[int, int]]:
    """Item ranges whose part file exists (parts are written atomically: present means complete)."""
    fs, root = storage.resolve(out)
    folder = storage.join(root, PARTS_DIR)
    if not storage.exists(fs, folder):
        return set()
    matches = (_PART_RE.match(p.rsplit("/", 1)[-1]) for p in fs.ls(folder, detail=False))
    return {(int(m[1]), int(m[2])) for m in matches if m}


# ---------------------------------------------------------------- writing

def write_part(out: str, start: int, stop: int, images: np.ndarray, labels: np.ndarray, seeds: np.ndarray,
               png: bool) -> None:
    fs, root = storage.resolve(out)
    if png:
        for offset, image in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            storage.write_bytes(fs, storage.join(root, PNG_DIR, f"{start + offset:08d}.png"), buffer.getvalue())
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, indices=np.arange(start, stop), seeds=seeds)
    storage.write_bytes(fs, storage.join(root, PARTS_DIR, part_name(start, stop)), buffer.getvalue())


def read_part(out: str, start: int, stop: int) -> dict[str, np.ndarray]:
    fs, root = storage.resolve(out)
    with np.load(io.BytesIO(fs.cat_file(storage.join(root, PARTS_DIR, part_name(start, stop))))) as data:
        return {key: data[key] for key in data.files}


def assemble_npz(out: str, parts: list[tuple[int, int]], image_shape: tuple[int, int, int]) -> str:
    """Stream every part, in item order, into ``samples.npz`` (arr_0 uint8 NHWC, arr_1 labels),
    without holding all images in memory; written atomically."""
    fs, root = storage.resolve(out)
    total = parts[-1][1]
    path = storage.join(root, SAMPLES)
    labels = []
    with storage.open_atomic(fs, path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_1_0(entry, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                         "fortran_order": False, "shape": (total, *image_shape)})
            for start, stop in parts:
                part = read_part(out, start, stop)
                if part["images"].shape != (stop - start, *image_shape) or part["images"].dtype != np.uint8:
                    raise ValueError(f"{out}: part {part_name(start, stop)} holds {part['images'].dtype} "
                                     f"{part['images'].shape}; expected uint8 {(stop - start, *image_shape)}")
                entry.write(np.ascontiguousarray(part["images"]).tobytes())
                labels.append(part["labels"])
        with archive.open("arr_1.npy", "w") as entry:
            np.lib.format.write_array(entry, np.concatenate(labels).astype(np.int64))
    return storage.to_url(fs, path)


# ---------------------------------------------------------------- the actor

class SampleActor:
    """Ray Data callable class: loads the models once, then turns one part (a one-row batch holding
    its item range) into images, written by the actor (shared storage) or returned to the driver."""

    def __init__(self, *, config: SampleConfig, labels: np.ndarray, num_classes: int, loader: Loader,
                 write: bool):
        self.config, self.labels, self.write = config, labels, write
        # "gpu" placed this actor on a Ray GPU; it still samples on CPU where that node's CUDA is unusable.
        device = pick_device("cpu" if config.device == "cpu" else "auto")
        self.sampler = build_image_sampler(config, num_classes, loader, device)

    def sample_range(self, start: int, stop: int) -> dict[str, np.ndarray]:
        size = self.config.batch_size
        seeds = np.array([item_seed(self.config.seed, i) for i in range(start, stop)], dtype=np.uint64)
        labels = self.labels[start:stop]
        images = np.concatenate([self.sampler(labels[i:i + size], seeds[i:i + size])
                                 for i in range(0, stop - start, size)])
        return {"images": images, "labels": labels, "seeds": seeds}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        result = self.sample_range(start, stop)
        if self.write:
            write_part(self.config.out, start, stop, **result, png=self.config.png)
            return {"start": batch["start"], "stop": batch["stop"]}
        return {"start": batch["start"], "stop": batch["stop"], **{k: v[None] for k, v in result.items()}}


def build_image_sampler(config: SampleConfig, num_classes: int, loader: Loader, device: Any) -> ImageSampler:
    dit, _ = loader(config.dit, device)
    decoder, _ = loader(config.decoder, device)
    guide = loader(config.guide, device)[0] if config.guide else None
    stats = load_latent_stats(read_export_facts(config.dit, "dit"))
    guidance = Guidance(cfg_scale=config.cfg_scale, interval=tuple(config.cfg_interval),
                        guide_scale=config.guide_scale)
    return ImageSampler(dit, decoder, stats, sampler=config.sampler, guidance=guidance, num_classes=num_classes,
                        guide=guide, device=device, precision=config.precision)


# ---------------------------------------------------------------- the job

def check_exports(config: SampleConfig) -> tuple[ExportFacts, ExportFacts, ExportFacts | None]:
    """Read the exports' JSON and refuse a DiT, decoder (and guide) made for different latents."""
    dit = read_export_facts(config.dit, "dit")
    decoder = read_export_facts(config.decoder, "decoder")
    check_same_latents(dit.latent_spec, decoder.latent_spec, f"the DiT ({dit.url})", f"the decoder ({decoder.url})")
    load_latent_stats(dit)
    guide = None
    if config.guide:
        guide = read_export_facts(config.guide, "dit")
        check_same_latents(dit.latent_spec, guide.latent_spec, f"the DiT ({dit.url})", f"the guide ({guide.url})")
        if guide.kwargs.get("num_classes") != dit.kwargs.get("num_classes"):
            raise ValueError(f"the guide {config.guide} has {guide.kwargs.get('num_classes')} classes, the DiT "
                             f"{dit.kwargs.get('num_classes')}; AutoGuidance needs the same classes")
    return dit, decoder, guide


def settings_of(config: SampleConfig, dit: ExportFacts, decoder: ExportFacts, guide: ExportFacts | None) -> dict:
    """Everything that determines the images (not the worker count, the device or --png)."""
    exports = {"dit": {"url": dit.url, "digest": dit.digest}, "decoder": {"url": decoder.url, "digest": decoder.digest}}
    if guide is not None:
        exports["guide"] = {"url": guide.url, "digest": guide.digest}
    return {
        "exports": exports,
        "num_samples": config.num_samples,
        "classes": "all" if config.classes is None else list(config.classes),
        "labels": config.labels,
        "sampler": asdict(config.sampler),
        "cfg_scale": config.cfg_scale, "cfg_interval": list(config.cfg_interval), "guide_scale": config.guide_scale,
        "seed": config.seed, "batch_size": config.batch_size, "part_size": config.part_size,
        "precision": config.precision,
    }


def _open_run(config: SampleConfig, settings: dict) -> dict:
    fs, root = storage.resolve(config.out)
    path = storage.join(root, SETTINGS)
    if storage.exists(fs, path):
        existing = storage.read_json(fs, path)
        have = existing.get("settings") or {}
        diff = [f"{key}: {config.out} has {have.get(key)!r}, this run asks for {settings.get(key)!r}"
                for key in sorted(set(have) | set(settings)) if have.get(key) != settings.get(key)]
        if existing.get("format") != FORMAT or diff:
            raise ValueError(f"{config.out} holds samples made with other settings; refusing to mix:\n  "
                             + "\n  ".join(diff or ["not a rae-samples folder"])
                             + "\nRerun with the same settings to resume, or use another --out.")
        return existing
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "status": "in_progress", "settings": settings}
    storage.write_json(fs, path, record)
    return record


def run_sampling(config: SampleConfig, *, loader: Loader, actor_cls: type = SampleActor) -> SampleResult:
    """Sample every missing part of ``config.out`` on the current Ray cluster, then assemble the ADM
    ``samples.npz``. ``loader(url, device)`` builds an exported model (``jobs.train.export.load_exported_model``)."""
    dit, decoder, guide = check_exports(config)
    settings = settings_of(config, dit, decoder, guide)
    num_classes = int(dit.kwargs["num_classes"])
    labels = plan_labels(config, num_classes)
    record = _open_run(config, settings)
    parts = plan_parts(config.num_samples, config.part_size)
    pending = [p for p in parts if p not in done_parts(config.out)]
    fs, root = storage.resolve(config.out)
    if not pending and record.get("status") == "complete" and (
            not config.npz or storage.exists(fs, storage.join(root, SAMPLES))):
        return SampleResult(config.out, config.num_samples, len(parts), 0, record.get("samples"), settings)
    if pending:
        _run_pool(config, pending, labels, num_classes, loader, actor_cls)
    size = decoder.latent_spec.image_size
    samples = assemble_npz(config.out, parts, (size, size, 3)) if config.npz else None
    counts = np.bincount(labels, minlength=num_classes)
    storage.write_json(fs, storage.join(root, SETTINGS), dict(
        record, status="complete", samples=samples, image_size=size,
        class_counts={"min": int(counts[counts > 0].min()), "max": int(counts.max()),
                      "classes": int((counts > 0).sum())}))
    return SampleResult(config.out, config.num_samples, len(parts), len(pending), samples, settings)


def _run_pool(config: SampleConfig, pending: list[tuple[int, int]], labels: np.ndarray, num_classes: int,
              loader: Loader, actor_cls: type) -> None:
    out_local = storage.is_process_local(storage.resolve(config.out)[0])
    pool = plan_actor_pool(config.device, config.num_actors)
    rows = [{"start": start, "stop": stop} for start, stop in pending]

    def stages(ds: ray.data.Dataset) -> ray.data.Dataset:
        return pool.map(ds, actor_cls, {"config": config, "labels": labels, "num_classes": num_classes,
                                        "loader": loader, "write": not out_local})

    def written(batch: dict[str, np.ndarray]) -> None:
        if out_local:
            write_part(config.out, int(batch["start"][0]), int(batch["stop"][0]), batch["images"][0],
                       batch["labels"][0], batch["seeds"][0], config.png)

    run_through_pool(rows, pool, stages, written, actors="sampler", verb="sample", unit="part",
                     gpu_wait_s=config.gpu_wait_s, progress=config.progress)
