"""`rae shards`, `rae encode` and `rae store`: the data half of the command line."""
from __future__ import annotations

import argparse
import json

from pipelines.image_decode import DecodeLimits

_STORAGE_HELP = ("any fsspec URL (file://, s3://, gs://, memory://) or a path; S3 endpoints and credentials come "
                 "from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")


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
    make.add_argument("src", help="image folder with one subfolder per class (ImageNet train layout)")
    make.add_argument("dest", help="where the shards go; " + _STORAGE_HELP)
    make.add_argument("--max-count", type=int, default=1000, help="images per shard (default 1000)")
    make.add_argument("--max-mb", type=float, default=1024.0, help="image bytes per shard, in MiB (default 1024)")
    make.add_argument("--seed", type=int, default=0, help="seed of the order samples are spread over shards")
    make.add_argument("--no-shuffle", action="store_true", help="keep folder order (shards then hold few classes)")
    make.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    make.add_argument("--no-progress", action="store_true")
    make.set_defaults(func=_run_shards_make)
    extract = commands.add_parser("extract", help="tar shards -> image folder DEST/<class>/<image>")
    extract.add_argument("shards", help="a folder of .tar files, a glob, a brace pattern or one .tar")
    extract.add_argument("dest", help="an empty image folder to create")
    extract.add_argument("--no-progress", action="store_true")
    extract.set_defaults(func=_run_shards_extract)


def _register_encode(subparsers: argparse._SubParsersAction) -> None:
    encode = subparsers.add_parser(
        "encode", help="encode shards into a latent store (Ray Data; resumable)",
        description="Read shards, ADM-centre-crop on CPU, encode in an actor pool (one GPU per actor when the "
                    "cluster has GPUs), write Parquet + manifest + normalization stats. Rerunning finishes an "
                    "interrupted store; a store made with another encoder or preprocessing is refused.")
    encode.add_argument("--shards", required=True, help="a folder of .tar files, a glob or a brace pattern; "
                                                        + _STORAGE_HELP)
    encode.add_argument("--store", required=True, help="the latent store URL")
    encode.add_argument("--encoder", help="encoder preset, see `rae models --kind encoder` (default dinov2-b-reg4)")
    encode.add_argument("--weights", help="encoder weights file (.safetensors or torch) instead of the hub's")
    encode.add_argument("--input-size", type=int, help="encoder input size (default: the preset's)")
    encode.add_argument("--flip", action="store_true", help="also store a horizontally flipped view of each image")
    encode.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored latent dtype")
    encode.add_argument("--batch-size", type=int, default=256,
                        help="images per encoder forward (256 was the fastest for DINOv2-B at bf16 on an H200)")
    encode.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                        help="auto: one GPU per actor when the cluster has GPUs, else CPU")
    encode.add_argument("--actors", type=int, help="encoder actors (default: one per GPU, or 1 on CPU)")
    encode.add_argument("--gpu-wait", type=float, default=600.0,
                        help="seconds GPU actors may take to start before the job fails (default 600)")
    encode.add_argument("--max-pixels", type=int, default=DecodeLimits.max_pixels,
                        help="reject larger images (decompression bombs)")
    encode.add_argument("--min-side", type=int, default=DecodeLimits.min_side, help="reject smaller images")
    encode.add_argument("--address", help="Ray cluster address (default: the current or a new local instance)")
    encode.add_argument("--no-progress", action="store_true")
    encode.set_defaults(func=_run_encode)


def _register_store(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser("store", help="inspect or verify a latent store")
    commands = store.add_subparsers(dest="store_command", metavar="<info|verify>", required=True)
    info = commands.add_parser("info", help="what a store holds (from its manifest)")
    info.add_argument("url")
    info.set_defaults(func=_run_store_info)
    verify = commands.add_parser("verify", help="read every row: counts, duplicates, shapes, NaN/inf, stats")
    verify.add_argument("url")
    verify.set_defaults(func=_run_store_verify)


def _run_shards_make(args: argparse.Namespace) -> int:
    from pipelines.shards import make_shards

    report = make_shards(args.src, args.dest, max_count=args.max_count, max_bytes=int(args.max_mb * 2**20),
                         shuffle_seed=None if args.no_shuffle else args.seed, prefix=args.prefix,
                         progress=not args.no_progress)
    print(f"{report.images} images in {len(report.classes)} classes -> {len(report.shards)} shards at {args.dest}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} files that are not images, e.g. {report.skipped[:3]}")
    return 0


def _run_shards_extract(args: argparse.Namespace) -> int:
    from pipelines.shards import extract_shards

    report = extract_shards(args.shards, args.dest, progress=not args.no_progress)
    print(f"{report.images} images -> {args.dest}")
    for item in report.rejected:
        print(f"rejected {item['shard']} {item['key']!r}: {item['reason']}")
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    import ray

    from pipelines.encode import EncodeConfig, encode_to_store
    from rae.encoders import DEFAULT_ENCODER

    config = EncodeConfig(shards=args.shards, store=args.store, encoder=args.encoder or DEFAULT_ENCODER,
                          weights=args.weights, input_size=args.input_size, flip=args.flip, latent_dtype=args.dtype,
                          batch_size=args.batch_size, device=args.device, num_actors=args.actors,
                          gpu_wait_s=args.gpu_wait, limits=DecodeLimits(min_side=args.min_side,
                                                                        max_pixels=args.max_pixels),
                          progress=not args.no_progress)
    if args.address and not ray.is_initialized():
        ray.init(address=args.address)
    result = encode_to_store(config)
    verb = "encoded" if result.encoded_shards else "already complete, nothing to do:"
    print(f"{verb} {result.encoded_shards}/{result.shards} shards; store {result.store} holds {result.rows} rows, "
          f"{result.rejected} rejected inputs (see rejected.jsonl)")
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
    return 1
