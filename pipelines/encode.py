"""The encode job: webdataset shards -> latent store, on Ray Data.

    shards (one row each) -> decode + ADM crop (CPU tasks) -> encoder actor pool (GPU, or CPU)
                          -> commit the shard (CPU tasks: Parquet part, partial moments, marker)

With ``decode`` gpu (the default on GPU actors) the CPU tasks only read the tar and the images'
headers: JPEGs travel as bytes and the encoder actors decode and crop them on their GPU
(pipelines/shard_jpegs.py, pipelines/gpu_decode.py); other images are decoded by the CPU tasks as before.

Why one row per shard, read with our own tar reader instead of ``read_webdataset``: each shard is
decoded, encoded and committed as a unit, so a killed job resumes exactly at shard granularity (no
row lost or written twice), statistics are merged from per-shard float64 moments in shard order (a
resumed store equals an uninterrupted one bit for bit), and every bad member and a truncated tar is
recorded with its shard's name. The encoder actor micro-batches a shard's images itself.

``memory://`` is visible to this process only, so for it the driver reads the shards and commits
the results itself; decoding and encoding still run on Ray.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import ray

from pipelines import latent_store, storage
from pipelines.actor_pool import plan_actor_pool, run_through_pool
from pipelines.cluster_capacity import parse_count_range
from pipelines.encoder_actor import LatentEncoder
from pipelines.image_decode import ADM_CROP, DecodeLimits, decode_shard_batch
from pipelines.shard_commit import commit_shard_batch
from pipelines.shard_jpegs import split_shard_batch
from pipelines.shards import ShardInfo, list_shards, read_class_names
from pipelines.storage import StorageOptions
from rae.devices import check_device_choice
from rae.encoders import DEFAULT_ENCODER, ENCODER_RESIZE, RepresentationEncoder, load_encoder
from rae.latent_spec import STATS_FILE

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class EncodeConfig:
    shards: str
    store: str
    encoder: str = DEFAULT_ENCODER
    encoder_weights: str | None = None    # a local .safetensors / torch file, readable on every worker
    encoder_input_size: int | None = None  # encoder input size; None: the preset's (224 for DINOv2-B)
    flip: bool = False                    # also store a horizontally flipped view (view=1)
    latent_dtype: str = "float16"
    batch_size: int = 256                 # images per encoder forward (256: the fastest DINOv2-B batch on an H200)
    device: str = "auto"                  # auto: one GPU per actor when the cluster has or can add GPUs, else CPU
    num_actors: int | tuple[int, int] | None = None  # pool size N or (MIN, MAX); None: 1..GPUs the cluster can have (1 on CPU)
    gpu_wait_s: float = 600.0             # how long GPU actors may take to start before the job fails
    decode: str = "auto"                  # JPEG decode + crop: gpu in the encoder actors (nvJPEG), cpu in CPU tasks; auto: gpu on GPU actors
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    storage_options: StorageOptions | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_device_choice(self.device)
        if self.decode not in DECODE_CHOICES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}; got {self.decode!r}")
        if self.decode == "gpu" and self.device == "cpu":
            raise ValueError("--decode gpu decodes JPEGs on the encoder actors' GPUs, and --device cpu gives them "
                             "none: pass --decode cpu (or auto), or --device gpu (or auto)")
        if self.num_actors is not None:
            object.__setattr__(self, "num_actors", parse_count_range(self.num_actors, "num_actors"))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.latent_dtype not in latent_store.LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {sorted(latent_store.LATENT_DTYPES)}, "
                             f"got {self.latent_dtype!r}")


@dataclass(frozen=True)
class EncodeResult:
    store: str
    shards: int
    encoded_shards: int                   # committed by this run
    rows: int
    rejected: int
    manifest: dict
    workers: dict[str, int] = field(default_factory=dict)  # "node type gpu, device cuda" -> shards this run encoded there


def software_versions(packages: tuple[str, ...] = ("rae", "torch", "ray", "pyarrow", "timm", "pillow")) -> dict:
    """Installed versions of ``packages`` (None where one is missing): recorded in a store's manifest."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def plan_manifest(config: EncodeConfig, encoder: RepresentationEncoder, shards: list[ShardInfo],
                  class_names: list[str] | None) -> dict:
    return latent_store.new_manifest(
        latent_spec=encoder.latent_spec(stats=STATS_FILE),
        preprocessing={"crop": ADM_CROP, "color": "RGB (alpha over white)", "encoder_resize": ENCODER_RESIZE,
                       "views": ["original", "hflip"] if config.flip else ["original"],
                       "limits": dataclasses.asdict(config.limits)},
        latent_dtype=config.latent_dtype, shards=shards, class_names=class_names, software=software_versions())


def encode_to_store(config: EncodeConfig, *, encoder_cls: type = LatentEncoder) -> EncodeResult:
    """Encode every shard not yet in the store, then finalize it. Idempotent and resumable.

    A complete store with the same identity is returned untouched; a store made from other shards,
    encoder or preprocessing raises ``StoreMismatchError`` naming each difference.
    """
    opts = config.storage_options
    shards = list_shards(config.shards, opts)
    class_names = read_class_names(shards, opts)
    encoder = load_encoder(config.encoder, weights=config.encoder_weights, input_size=config.encoder_input_size,
                           device="cpu")
    wanted = plan_manifest(config, encoder, shards, class_names)
    existing = latent_store.read_manifest(config.store, opts)
    if existing is not None:
        latent_store.check_compatible(existing, wanted, config.store)
        if existing.get("status") == "complete":
            log.info("store %s already holds these shards; nothing to do", config.store)
            return EncodeResult(config.store, len(shards), 0, existing["rows"], existing["rejected"], existing)
    latent_store.write_manifest(config.store, wanted, opts)
    leftovers = latent_store.remove_temporaries(config.store, opts)
    if leftovers:
        log.info("removed %d temporary file(s) an interrupted encode left in %s", len(leftovers), config.store)

    done = latent_store.done_markers(config.store, wanted, opts)
    pending = [i for i in range(len(shards)) if i not in done]
    workers = _run_pipeline(config, encoder, wanted, shards, pending, class_names, encoder_cls) if pending else {}
    manifest = latent_store.finalize(config.store, wanted, opts)
    return EncodeResult(config.store, len(shards), len(pending), manifest["rows"], manifest["rejected"], manifest,
                        workers)


def _run_pipeline(config: EncodeConfig, encoder: RepresentationEncoder, manifest: dict, shards: list[ShardInfo],
                  pending: list[int], class_names: list[str] | None, encoder_cls: type) -> dict[str, int]:
    """Encode the ``pending`` shards; returns how many each kind of worker (node type, device) encoded."""
    opts = config.storage_options
    shards_local = storage.is_process_local(storage.resolve(config.shards, opts)[0])
    store_local = storage.is_process_local(storage.resolve(config.store, opts)[0])
    pool = plan_actor_pool(config.device, config.num_actors)
    decode_on_actors = decodes_on_actors(config.decode, pool.use_gpu)
    # Ray starts a num_cpus=1 actor with OMP_NUM_THREADS=1; on CPU the encoder is the job's whole
    # cost (decoding is ~2% of it), so each CPU actor uses its share of the cluster's cores.
    cpu_threads = None if pool.use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // pool.max_size)

    rows = []
    for index in pending:
        shard = shards[index]
        row = {"shard_index": index, "shard_url": shard.url, "shard_name": shard.name, "shard_size": shard.size}
        if shards_local:
            fs, path = storage.resolve(shard.url, opts)
            row["shard_bytes"] = fs.cat_file(path)
        rows.append(row)
    commit_kwargs = {"store": config.store, "manifest": manifest, "storage_options": opts}

    def stages(ds: ray.data.Dataset) -> ray.data.Dataset:
        # A decode task holds a shard and its decoded crops: ask for that memory. Asking for it also
        # keeps decoding a separate operator (a request the actor does not share) that overlaps the
        # encoder, instead of being fused into the encoder actor.
        decode_memory = max(64 * 2**20, 3 * max(shards[i].size for i in pending))
        decode = split_shard_batch if decode_on_actors else decode_shard_batch
        ds = ds.map_batches(decode, batch_size=1, num_cpus=1, memory=decode_memory, fn_kwargs={
            "image_size": encoder.spec.image_size, "limits": config.limits,
            "num_classes": len(class_names) if class_names else None, "storage_options": opts})
        ds = pool.map(ds, encoder_cls, {
            "encoder": config.encoder, "weights": config.encoder_weights, "input_size": encoder.spec.input_size,
            "flip": config.flip, "latent_dtype": config.latent_dtype, "batch_size": config.batch_size,
            "weights_digest": encoder.weights_digest, "cpu_threads": cpu_threads, "limits": config.limits})
        if not store_local:
            # Commit tasks import numpy and pyarrow only (pipelines.shard_commit: ~0.2 GB a worker
            # process, where importing this module's torch and timm made each ~0.9 GB). A whole CPU
            # each, and no more of them at once than encoder actors feed them: a commit takes a
            # fraction of an encode, so more would only hold more shards' latents in memory.
            ds = ds.map_batches(commit_shard_batch, batch_size=1, num_cpus=1,
                                compute=ray.data.TaskPoolStrategy(size=pool.max_size),
                                fn_kwargs=commit_kwargs)
        return ds

    workers: dict[str, int] = {}

    def committed(batch: dict[str, np.ndarray]) -> dict[str, int]:
        summary = commit_shard_batch(batch, **commit_kwargs) if store_local else batch
        worker = describe_worker(json.loads(str(summary["encoded_on"][0])))
        workers[worker] = workers.get(worker, 0) + 1
        return {"rows": int(summary["rows"][0]), "rejected": int(summary["rejected"][0])}

    run_through_pool(rows, pool, stages, committed, actors="encoder", verb="encode", unit="shard",
                     gpu_wait_s=config.gpu_wait_s, progress=config.progress)
    if pool.use_gpu and any(w.endswith("device cpu") for w in workers):
        log.warning("encoder actors held a Ray GPU but found no usable CUDA and ran on CPU (%s)", workers)
    return workers


def decodes_on_actors(decode: str, gpu_actors: bool) -> bool:
    """Whether the encoder actors decode the JPEGs (``decode`` gpu, or auto on GPU actors); ``decode``
    gpu where the actors get no GPU is refused."""
    if decode == "gpu" and not gpu_actors:
        raise ValueError("--decode gpu, but the encoder actors run on CPU: this cluster has no GPU and cannot add "
                         "one. Pass --decode auto or cpu, or run on a cluster with GPUs.")
    return decode == "gpu" or (decode == "auto" and gpu_actors)


def describe_worker(encoded_on: dict | None) -> str:
    """``node type gpu, device cuda`` for the summary of where shards were encoded."""
    encoded_on = encoded_on or {}
    return f"node type {encoded_on.get('node_type') or 'unknown'}, device {encoded_on.get('device') or 'unknown'}"
