"""`rae shards`, `rae encode` and `rae store`: the data half of the command line."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from pipelines.cluster_capacity import parse_actor_count
from rae.devices import DEVICE_CHOICES
from jobs.config_overrides import Flag, absolute_paths, add_config_arguments, config_from_args
from jobs.user_paths import absolute_location

_STORAGE_HELP = ("any fsspec URL (file://, s3://, gs://, memory://) or a path; S3 endpoints and credentials come "
                 "from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")


@dataclass(frozen=True)
class ShardsMakeConfig:
    """`rae shards make`: pack an image folder (one subfolder per class) into tar shards."""

    src: str
    dest: str
    max_count: int = 1000          # images per shard
    max_mb: float = 1024.0         # image bytes per shard, in MiB
    seed: int = 0                  # seed of the order samples are spread over shards
    shuffle: bool = True           # False: folder order (shards then hold few classes)
    prefix: str = "shard"
    progress: bool = True


@dataclass(frozen=True)
class ShardsExtractConfig:
    """`rae shards extract`: tar shards back into an image folder DEST/<class>/<image>."""

    shards: str
    dest: str
    progress: bool = True


PROGRESS_FLAG = Flag("progress", "no progress bar", name="--no-progress", const=False)
SHARDS_MAKE_FLAGS = (
    Flag("src", "image folder with one subfolder per class (ImageNet train layout)", positional=True),
    Flag("dest", "where the shards go; " + _STORAGE_HELP, positional=True),
    Flag("max_count", "images per shard"),
    Flag("max_mb", "image bytes per shard, in MiB"),
    Flag("seed", "seed of the order samples are spread over shards"),
    Flag("shuffle", "keep folder order (shards then hold few classes)", name="--no-shuffle", const=False),
    Flag("prefix", "shard file name prefix"),
    PROGRESS_FLAG,
)
SHARDS_EXTRACT_FLAGS = (
    Flag("shards", "a folder of .tar files, a glob, a brace pattern or one .tar", positional=True),
    Flag("dest", "an empty image folder to create", positional=True),
    PROGRESS_FLAG,
)
ENCODE_FLAGS = (
    Flag("shards", "a folder of .tar files, a glob or a brace pattern; " + _STORAGE_HELP),
    Flag("store", "the latent store URL"),
    Flag("encoder", "encoder preset, see `rae models --kind encoder`"),
    Flag("encoder_weights", "encoder weights file (.safetensors or torch) instead of the hub's"),
    Flag("encoder_input_size", "encoder input size (default: the preset's)", type=int),
    Flag("flip", "also store a horizontally flipped view of each image", const=True),
    Flag("latent_dtype", "stored latent dtype", name="--dtype", choices=("float16", "float32")),
    Flag("batch_size", "images per encoder forward (256 was the fastest for DINOv2-B at bf16 on an H200)"),
    Flag("device", "auto: one GPU per actor when the cluster has GPUs or its autoscaler can add GPU nodes "
                   "(decided from the autoscaler's node types, not the GPUs up now), else CPU", choices=DEVICE_CHOICES),
    Flag("decode", "where JPEGs are decoded and ADM-cropped: gpu, on the encoder actors' GPUs (nvJPEG; other images "
                   "and what nvJPEG refuses on CPU); cpu, in CPU tasks; auto: gpu when the actors get GPUs",
         choices=("auto", "cpu", "gpu")),
    Flag("num_actors", "encoder actors: N, or MIN,MAX for a pool that grows as GPU nodes join (default: 1 up to "
                       "one per GPU the cluster can have; 1 on CPU)", type=parse_actor_count, metavar="N|MIN,MAX"),
    Flag("gpu_wait_s", "seconds the first GPU actor may take to start (the autoscaler adding a GPU node) before "
                       "the job fails with the autoscaler's reason"),
    Flag("limits.max_pixels", "reject larger images (decompression bombs)"),
    Flag("limits.min_side", "reject smaller images"),
    PROGRESS_FLAG,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_shards(subparsers)
    _register_encode(subparsers)
    _register_store(subparsers)


def _register_shards(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="make webdataset tar shards from an image folder, or extract them",
                                   description="Webdataset tar shards. " + _STORAGE_HELP)
    commands = shards.add_subparsers(dest="shards_command", metavar="<make|extract>", required=True)
    make = commands.add_parser("make", help="image folder (SRC/<class>/<image>) -> tar shards at DEST",
                               description="Pack SRC/<class>/<image> into DEST/shard-000000.tar, ... with .cls "
                                           "labels and DEST/classes.json. Keys are <class>/<stem>.")
    add_config_arguments(make, ShardsMakeConfig, SHARDS_MAKE_FLAGS, paths=("src", "dest"))
    make.set_defaults(func=_run_shards_make)
    extract = commands.add_parser("extract", help="tar shards -> image folder DEST/<class>/<image>")
    add_config_arguments(extract, ShardsExtractConfig, SHARDS_EXTRACT_FLAGS, paths=("shards", "dest"))
    extract.set_defaults(func=_run_shards_extract)


def _register_encode(subparsers: argparse._SubParsersAction) -> None:
    from pipelines.encode import EncodeConfig

    encode = subparsers.add_parser(
        "encode", help="encode shards into a latent store (Ray Data; resumable)",
        description="Read shards, ADM-centre-crop on CPU, encode in an actor pool (one GPU per actor when the "
                    "cluster has GPUs or its autoscaler can add GPU nodes: the pool grows as they join), write Parquet + manifest + normalization stats. Rerunning finishes an "
                    "interrupted store; a store made with another encoder or preprocessing is refused. "
                    "Config: pipelines.encode.EncodeConfig.")
    add_config_arguments(encode, EncodeConfig, ENCODE_FLAGS, paths=("shards", "store", "encoder_weights"))
    encode.add_argument("--address", help="Ray cluster address (default: the current or a new local instance)")
    encode.set_defaults(func=_run_encode)


def _register_store(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser("store", help="inspect or verify a latent store")
    commands = store.add_subparsers(dest="store_command", metavar="<info|verify>", required=True)
    info = commands.add_parser("info", help="what a store holds (from its manifest)")
    info.add_argument("url", type=absolute_location)
    info.set_defaults(func=_run_store_info)
    verify = commands.add_parser("verify", help="read every row: counts, duplicates, shapes, NaN/inf, stats")
    verify.add_argument("url", type=absolute_location)
    verify.set_defaults(func=_run_store_verify)


def _run_shards_make(args: argparse.Namespace) -> int:
    from pipelines.shards import make_shards

    config: ShardsMakeConfig = absolute_paths(config_from_args(args), args)
    report = make_shards(config.src, config.dest, max_count=config.max_count, max_bytes=int(config.max_mb * 2**20),
                         shuffle_seed=config.seed if config.shuffle else None, prefix=config.prefix,
                         progress=config.progress)
    print(f"{report.images} images in {len(report.classes)} classes -> {len(report.shards)} shards at {config.dest}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} files that are not images, e.g. {report.skipped[:3]}")
    return 0


def _run_shards_extract(args: argparse.Namespace) -> int:
    from pipelines.shards import extract_shards

    config: ShardsExtractConfig = absolute_paths(config_from_args(args), args)
    report = extract_shards(config.shards, config.dest, progress=config.progress)
    print(f"{report.images} images -> {config.dest}")
    for item in report.rejected:
        print(f"rejected {item['shard']} {item['key']!r}: {item['reason']}")
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    import ray

    from pipelines.encode import encode_to_store

    config = absolute_paths(config_from_args(args), args)
    if args.address and not ray.is_initialized():
        ray.init(address=args.address)
    result = encode_to_store(config)
    verb = "encoded" if result.encoded_shards else "already complete, nothing to do:"
    print(f"{verb} {result.encoded_shards}/{result.shards} shards; store {result.store} holds {result.rows} rows, "
          f"{result.rejected} rejected inputs (see rejected.jsonl)")
    if result.workers:
        print("encoded on: " + "; ".join(f"{count} shard(s) on {worker}" for worker, count in sorted(result.workers.items())))
    return 0


def _run_store_info(args: argparse.Namespace) -> int:
    from pipelines.store_check import store_info

    print(json.dumps(store_info(args.url), indent=2))
    return 0


def _run_store_verify(args: argparse.Namespace) -> int:
    from pipelines.store_check import verify_store

    report = verify_store(args.url)
    if report.ok:
        print(f"ok: {report.store} ({report.rows} rows)")
        return 0
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"{len(report.problems)} problem(s) in {report.store} ({report.rows} rows read)")
    return 1
