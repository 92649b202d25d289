"""`rae eval`: the numbers papers report, from samples, shards and exported decoders.

    rae eval --samples NPZ|DIR --ref REF.npz --inception PATH|offline   FID / sFID / IS / precision / recall
    rae eval reference --shards URL --out REF.npz --inception ...  reference statistics of real images
    rae eval rfid --decoder EXPORT --shards URL --inception ...    rFID (and --fd-dinov2) of reconstructions

Metrics are printed as JSON (and written with --json-out). With ``--inception offline`` the
numbers come from the offline Inception stand-in and are labelled so: they compare runs, not papers.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch

from jobs.cli.output import emit_json
from jobs.config_overrides import Flag, MissingFields, absolute_paths, add_config_arguments, config_from_args
from jobs.train.export import load_exported_model
from jobs.user_paths import PathField
from rae.devices import DEVICE_CHOICES, pick_device


def _inception(spec: str, device: torch.device):
    from rae.evaluation import load_adm_inception, load_offline_inception

    return load_offline_inception(device=device) if spec == "offline" else load_adm_inception(spec, device=device)


def _finite(result: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite metric(s) {bad}: the images or the reference statistics are degenerate")
    return result


@dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """How every `rae eval` command scores images."""

    inception: str                  # the ADM Inception TorchScript file, or "offline" for the offline stand-in
    batch_size: int = 100
    device: str = "auto"            # auto | gpu | cpu
    json_out: str | None = None     # also write the JSON result to this file


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ScoringConfig):
    """`rae eval`: samples against reference statistics."""

    samples: str                    # ADM .npz, a `rae sample` output folder, or a folder of PNGs
    ref: str                        # reference statistics .npz


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig(ScoringConfig):
    """`rae eval reference`: reference statistics of real images."""

    shards: str
    out: str
    image_size: int = 256           # ADM centre crop (paper: 256)
    max_images: int | None = None   # None: every image
    keep_features: int = 10_000     # features kept for precision/recall


@dataclass(frozen=True, kw_only=True)
class RfidConfig(ScoringConfig):
    """`rae eval rfid`: reconstructions of shards through a decoder against the cropped originals."""

    decoder: str
    shards: str
    encoder_weights: str | None = None  # None: as the encoder preset loads them
    fd_dinov2: bool = False             # also FD-DINOv2, in the features of the decoder's encoder
    max_images: int | None = None


SCORING_FLAGS = (
    Flag("inception", "ADM Inception TorchScript file, or 'offline' for the offline stand-in", metavar="PATH|offline"),
    Flag("batch_size", "images per forward"),
    Flag("device", "auto: the GPU when there is one", choices=DEVICE_CHOICES),
    Flag("json_out", "also write the JSON result to this file"),
)
SCORING_PATHS = (PathField("inception", words=("offline",)), "json_out")
EVAL_FLAGS = (
    Flag("samples", "ADM .npz, a `rae sample` output folder, or a folder of PNGs"),
    Flag("ref", "reference statistics .npz (`rae eval reference`, or an ADM reference batch)"),
    *SCORING_FLAGS,
)
REFERENCE_FLAGS = (
    Flag("shards", "webdataset shards (folder, glob or URL)"),
    Flag("out", "where to write the statistics (.npz)"),
    Flag("image_size", "ADM centre crop size (paper: 256)"),
    Flag("max_images", "use only the first N images", type=int),
    Flag("keep_features", "features kept for precision/recall"),
    *SCORING_FLAGS,
)
RFID_FLAGS = (
    Flag("decoder", "decoder export folder"),
    Flag("shards", "validation shards (folder, glob or URL)"),
    Flag("encoder_weights", "the encoder's weights file (default: as the preset loads them)"),
    Flag("fd_dinov2", "also FD-DINOv2 (features of the decoder's encoder)", const=True),
    Flag("max_images", "use only the first N images", type=int),
    *SCORING_FLAGS,
)

def _run_eval(args: argparse.Namespace) -> int:
    from pipelines.eval_images import iter_sample_images
    from rae.evaluation import evaluate

    try:
        config: EvalConfig = absolute_paths(config_from_args(args), args)
    except MissingFields:
        raise ValueError("rae eval needs --samples, --ref and --inception (or a subcommand: reference, rfid)") from None
    extractor = _inception(config.inception, pick_device(config.device))
    result = evaluate(iter_sample_images(config.samples, batch_size=config.batch_size), config.ref, extractor)
    result.update(samples=config.samples, reference=config.ref, offline_inception=config.inception == "offline")
    emit_json(_finite(result), config.json_out)
    return 0


def _run_reference(args: argparse.Namespace) -> int:
    from pipelines.eval_images import iter_shard_images
    from rae.evaluation import compute_reference_stats

    config: ReferenceConfig = absolute_paths(config_from_args(args), args)
    extractor = _inception(config.inception, pick_device(config.device))
    images = iter_shard_images(config.shards, config.image_size, batch_size=config.batch_size,
                               max_images=config.max_images)
    stats = compute_reference_stats(images, extractor, keep_features=config.keep_features,
                                    source=f"{config.shards} (ADM centre crop {config.image_size} px)")
    stats.save(config.out)
    emit_json({"out": config.out, "count": stats.count, "extractor_id": stats.extractor_id,
           "feature_space": stats.feature_space, "digest": stats.digest,
           "offline_inception": config.inception == "offline"}, config.json_out)
    return 0


def _run_rfid(args: argparse.Namespace) -> int:
    from pipelines.eval_images import iter_reconstructions, iter_shard_images
    from pipelines.exports import read_export_facts
    from rae.encoders import load_encoder
    from rae.evaluation import DinoV2Features, reconstruction_fid
    from rae.latent_spec import check_same_latents

    config: RfidConfig = absolute_paths(config_from_args(args), args)
    device = pick_device(config.device)
    trained_on = read_export_facts(config.decoder, "decoder").latent_spec
    encoder = load_encoder(trained_on.encoder, weights=config.encoder_weights, input_size=trained_on.input_size,
                           device=device)
    check_same_latents(trained_on, encoder.latent_spec(), f"the decoder {config.decoder}",
                       "the encoder loaded here (pass --encoder-weights with the decoder's encoder file)")
    decoder, _ = load_exported_model(config.decoder, device)
    size = encoder.spec.image_size

    def originals():
        return iter_shard_images(config.shards, size, batch_size=config.batch_size, max_images=config.max_images)

    extractors = {"rfid": _inception(config.inception, device)}
    if config.fd_dinov2:
        extractors["fd_dinov2"] = DinoV2Features(encoder, device=device)
    result: dict[str, Any] = {"decoder": config.decoder, "shards": config.shards, "image_size": size,
                              "offline_inception": config.inception == "offline"}
    for name, extractor in extractors.items():
        scored = reconstruction_fid(originals(), iter_reconstructions(originals(), encoder, decoder, device=device),
                                    extractor)
        result[name] = scored["rfid"]
        result[f"{name}_extractor"] = scored["extractor_label"]
        result["num_images"] = scored["num_images"]
        result[f"{name}_comparable_with_papers"] = scored["comparable_with_papers"]
    emit_json(_finite(result), config.json_out)
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="FID / sFID / IS / precision-recall; reference stats; rFID",
                              description="Score samples against reference statistics (ADM protocol). "
                                          "--inception PATH: the ADM network's TorchScript port "
                                          "(inception-2015-12-05.pt), comparable with papers; --inception "
                                          "offline: the offline stand-in, numbers labelled as such. "
                                          "Configs: jobs.cli.evaluate.EvalConfig, ReferenceConfig, RfidConfig.")
    add_config_arguments(p, EvalConfig, EVAL_FLAGS, paths=("samples", "ref", *SCORING_PATHS))
    p.set_defaults(func=_run_eval)
    sub = p.add_subparsers(dest="eval_command", metavar="[reference|rfid]")

    ref = sub.add_parser("reference", help="reference statistics of real images from shards")
    add_config_arguments(ref, ReferenceConfig, REFERENCE_FLAGS, paths=("shards", "out", *SCORING_PATHS))
    ref.set_defaults(func=_run_reference)

    rfid = sub.add_parser("rfid", help="rFID of a decoder: reconstructions of shards vs the cropped originals")
    add_config_arguments(rfid, RfidConfig, RFID_FLAGS, paths=("decoder", "shards", "encoder_weights", *SCORING_PATHS))
    rfid.set_defaults(func=_run_rfid)


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_eval(subparsers)
