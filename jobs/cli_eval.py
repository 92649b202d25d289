"""`rae sample` and `rae eval`: images from exported models, and the numbers papers report.

    rae sample --dit EXPORT --decoder EXPORT --out URL [...]       Ray Data sampling job (resumable)
    rae eval --samples NPZ|DIR --ref REF.npz --inception PATH|offline   FID / sFID / IS / precision / recall
    rae eval reference --shards URL --out REF.npz --inception ...  reference statistics of real images
    rae eval rfid --decoder EXPORT --shards URL --inception ...    rFID (and --fd-dinov2) of reconstructions

Metrics are printed as JSON (and written with --json-out). With ``--inception offline`` the
numbers come from the offline Inception stand-in and are labelled so: they compare runs, not papers.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from jobs.export import load_exported_model
from rae.devices import pick_device


def parse_classes(text: str) -> tuple[int, ...] | None:
    """'all' -> None; '0,5,7' and ranges '0-9' -> a tuple of class indices."""
    if text.strip().lower() == "all":
        return None
    classes: list[int] = []
    try:
        for item in text.split(","):
            lo, sep, hi = item.strip().partition("-")
            classes.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes {text!r}: expected 'all' or a list like 0,5,10-19") from None
    return tuple(classes)


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-interval {text!r}: expected LO,HI such as 0.1,1.0") from None
    return lo, hi


def _inception(spec: str, device: torch.device):
    from rae.evaluation import load_adm_inception, load_offline_inception

    return load_offline_inception(device=device) if spec == "offline" else load_adm_inception(spec, device=device)


def _finite(result: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite metric(s) {bad}: the images or the reference statistics are degenerate")
    return result


def _emit(result: dict[str, Any], path: str | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


# ---------------------------------------------------------------- rae sample

def _run_sample(args: argparse.Namespace) -> int:
    from pipelines.sample_job import SampleConfig, run_sampling
    from rae.sampling import SamplerConfig

    png, npz = args.png, args.npz or not args.png
    config = SampleConfig(
        dit=args.dit, decoder=args.decoder, out=args.out, num_samples=args.num_samples, classes=args.classes,
        labels="random" if args.random_labels else "balanced",
        sampler=SamplerConfig(method=args.sampler, num_steps=args.steps), cfg_scale=args.cfg_scale,
        cfg_interval=args.cfg_interval, guide=args.guide, guide_scale=args.guide_scale, seed=args.seed,
        batch_size=args.batch_size, part_size=args.part_size or args.batch_size * max(1, 1024 // args.batch_size),
        precision=args.precision, png=png, npz=npz, num_actors=args.num_actors, device=args.device,
        gpu_wait_s=args.gpu_wait_s)
    result = run_sampling(config, loader=load_exported_model)
    _emit({"out": result.out, "num_samples": result.num_samples, "parts": result.parts,
           "sampled_parts": result.sampled_parts, "samples_npz": result.samples_npz}, None)
    return 0


def _add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="class-conditional samples from an exported DiT^DH + decoder",
                              description="Sample as a Ray Data job: one actor per GPU (CPU when the cluster has "
                                          "none), parts written atomically, rerun the same command to resume. "
                                          "Writes the ADM evaluation suite's samples.npz.")
    p.add_argument("--dit", required=True, help="DiT export folder (URL or path; <storage>/<run>/export)")
    p.add_argument("--decoder", required=True, help="decoder export folder, made for the same encoder")
    p.add_argument("--out", required=True, help="output folder (URL or path)")
    p.add_argument("--num-samples", type=int, default=50_000, help="number of images (paper: 50000)")
    p.add_argument("--classes", type=parse_classes, default=None, help="'all' (default) or e.g. 0,5,10-19")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--balanced", action="store_true", help="classes in turn, equal counts (default)")
    labels.add_argument("--random-labels", action="store_true", help="labels drawn at random with --seed")
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--steps", type=int, default=50, help="ODE grid points (paper: 50)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--cfg-interval", type=parse_interval, default=(0.0, 1.0), metavar="LO,HI",
                   help="guide only for model times in [LO, HI]")
    p.add_argument("--guide", help="AutoGuidance guide: a DiT export (e.g. a briefly trained DiT^DH-S)")
    p.add_argument("--guide-scale", type=float, default=1.0, help="AutoGuidance scale (paper: 1.42)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward (a recorded setting)")
    p.add_argument("--part-size", type=int, default=0, help="images per output part (a multiple of the batch "
                                                            "size; default about 1024)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32 (default; bf16 costs FID)")
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    p.add_argument("--npz", action="store_true", help="write samples.npz (the default unless only --png)")
    p.add_argument("--num-actors", type=int, help="sampler actors (default: one per GPU, or 1 on CPU)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--gpu-wait-s", type=float, default=120.0, help="fail if no GPU actor starts in this time")
    p.set_defaults(func=_run_sample)


# ---------------------------------------------------------------- rae eval

def _run_eval(args: argparse.Namespace) -> int:
    from pipelines.eval_images import iter_sample_images
    from rae.evaluation import evaluate

    if not (args.samples and args.ref and args.inception):
        raise ValueError("rae eval needs --samples, --ref and --inception (or a subcommand: reference, rfid)")
    extractor = _inception(args.inception, pick_device(args.device))
    result = evaluate(iter_sample_images(args.samples, batch_size=args.batch_size), args.ref, extractor)
    result.update(samples=args.samples, reference=args.ref, offline_inception=args.inception == "offline")
    _emit(_finite(result), args.json_out)
    return 0


def _run_reference(args: argparse.Namespace) -> int:
    from pipelines.eval_images import iter_shard_images
    from rae.evaluation import compute_reference_stats

    extractor = _inception(args.inception, pick_device(args.device))
    images = iter_shard_images(args.shards, args.image_size, batch_size=args.batch_size, max_images=args.max_images)
    stats = compute_reference_stats(images, extractor, keep_features=args.keep_features,
                                    source=f"{args.shards} (ADM centre crop {args.image_size} px)")
    stats.save(args.out)
    _emit({"out": args.out, "count": stats.count, "extractor_id": stats.extractor_id,
           "feature_space": stats.feature_space, "digest": stats.digest,
           "offline_inception": args.inception == "offline"}, None)
    return 0


def _run_rfid(args: argparse.Namespace) -> int:
    from pipelines.eval_images import iter_reconstructions, iter_shard_images
    from pipelines.exports import read_export_facts
    from rae.encoders import load_encoder
    from rae.evaluation import DinoV2Features, reconstruction_fid
    from rae.latent_spec import check_same_latents

    device = pick_device(args.device)
    trained_on = read_export_facts(args.decoder, "decoder").latent_spec
    encoder = load_encoder(trained_on.encoder, weights=args.encoder_weights, input_size=trained_on.input_size,
                           device=device)
    check_same_latents(trained_on, encoder.latent_spec(), f"the decoder {args.decoder}",
                       "the encoder loaded here (pass --encoder-weights with the decoder's encoder file)")
    decoder, _ = load_exported_model(args.decoder, device)
    size = encoder.spec.image_size

    def originals():
        return iter_shard_images(args.shards, size, batch_size=args.batch_size, max_images=args.max_images)

    extractors = {"rfid": _inception(args.inception, device)}
    if args.fd_dinov2:
        extractors["fd_dinov2"] = DinoV2Features(encoder, device=device)
    result: dict[str, Any] = {"decoder": args.decoder, "shards": args.shards, "image_size": size,
                              "offline_inception": args.inception == "offline"}
    for name, extractor in extractors.items():
        scored = reconstruction_fid(originals(), iter_reconstructions(originals(), encoder, decoder, device=device),
                                    extractor)
        result[name] = scored["rfid"]
        result[f"{name}_extractor"] = scored["extractor_label"]
        result["num_images"] = scored["num_images"]
        result[f"{name}_comparable_with_papers"] = scored["comparable_with_papers"]
    _emit(_finite(result), args.json_out)
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="FID / sFID / IS / precision-recall; reference stats; rFID",
                              description="Score samples against reference statistics (ADM protocol). "
                                          "--inception PATH: the ADM network's TorchScript port "
                                          "(inception-2015-12-05.pt), comparable with papers; --inception "
                                          "offline: the offline stand-in, numbers labelled as such.")
    p.add_argument("--samples", help="ADM .npz, a `rae sample` output folder, or a folder of PNGs")
    p.add_argument("--ref", help="reference statistics .npz (`rae eval reference`, or an ADM reference batch)")
    _eval_common(p)
    p.set_defaults(func=_run_eval)
    sub = p.add_subparsers(dest="eval_command", metavar="[reference|rfid]")

    ref = sub.add_parser("reference", help="reference statistics of real images from shards")
    ref.add_argument("--shards", required=True, help="webdataset shards (folder, glob or URL)")
    ref.add_argument("--out", required=True, help="where to write the statistics (.npz)")
    ref.add_argument("--image-size", type=int, default=256, help="ADM centre crop size (paper: 256)")
    ref.add_argument("--max-images", type=int, help="use only the first N images")
    ref.add_argument("--keep-features", type=int, default=10_000, help="features kept for precision/recall")
    _eval_common(ref, required=True)
    ref.set_defaults(func=_run_reference)

    rfid = sub.add_parser("rfid", help="rFID of a decoder: reconstructions of shards vs the cropped originals")
    rfid.add_argument("--decoder", required=True, help="decoder export folder")
    rfid.add_argument("--shards", required=True, help="validation shards (folder, glob or URL)")
    rfid.add_argument("--encoder-weights", help="the encoder's weights file (default: as the preset loads them)")
    rfid.add_argument("--fd-dinov2", action="store_true", help="also FD-DINOv2 (features of the decoder's encoder)")
    rfid.add_argument("--max-images", type=int, help="use only the first N images")
    _eval_common(rfid, required=True)
    rfid.set_defaults(func=_run_rfid)


def _eval_common(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--inception", required=required, metavar="PATH|offline",
                   help="ADM Inception TorchScript file, or 'offline' for the offline stand-in")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--json-out", help="also write the JSON result to this file")


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_sample(subparsers)
    _add_eval(subparsers)
