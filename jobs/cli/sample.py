"""`rae sample`: class-conditional images from exported models, as a resumable Ray Data job.

    rae sample --dit EXPORT --decoder EXPORT --out URL [...]

Prints a JSON summary (where the parts and samples.npz are). Config: pipelines.sample_job.SampleConfig.
"""
from __future__ import annotations

import argparse

from jobs.cli.output import emit_json
from pipelines.cluster_capacity import parse_actor_count
from rae.devices import DEVICE_CHOICES
from jobs.config_overrides import Flag, absolute_paths, add_config_arguments, config_from_args
from jobs.train.export import load_exported_model


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


SAMPLE_FLAGS = (
    Flag("dit", "DiT export folder (URL or path; <storage>/<run>/export)"),
    Flag("decoder", "decoder export folder, made for the same encoder"),
    Flag("out", "output folder (URL or path)"),
    Flag("num_samples", "number of images (paper: 50000)"),
    Flag("classes", "'all' (default) or e.g. 0,5,10-19", type=parse_classes),
    Flag("labels", "classes in turn, equal counts (default)", name="--balanced", const="balanced"),
    Flag("labels", "labels drawn at random with --seed", name="--random-labels", const="random"),
    Flag("sampler.method", "ODE solver", name="--sampler", choices=("euler", "heun")),
    Flag("sampler.num_steps", "ODE grid points (paper: 50)", name="--steps"),
    Flag("cfg_scale", "classifier-free guidance scale (1: none)"),
    Flag("cfg_interval", "guide only for model times in [LO, HI]", type=parse_interval, metavar="LO,HI"),
    Flag("guide", "AutoGuidance guide: a DiT export (e.g. a briefly trained DiT^DH-S)"),
    Flag("guide_scale", "AutoGuidance scale (paper: 1.42)"),
    Flag("seed", "seed of every image's noise (and of --random-labels)"),
    Flag("batch_size", "images per forward (a recorded setting)"),
    Flag("part_size", "images per output part, a multiple of the batch size; 0: about 1024"),
    Flag("precision", "tf32: fp32 with TF32 matmuls on CUDA, as the official sampler (the paper's FIDs); fp32; bf16 (costs FID)",
         choices=("tf32", "fp32", "bf16")),
    Flag("png", "also write one PNG per image", const=True),
    Flag("npz", "do not write samples.npz (with --png: PNGs only)", name="--no-npz", const=False),
    Flag("num_actors", "sampler actors: N or MIN,MAX (default: 1 up to one per GPU the cluster can have; 1 on CPU)",
         type=parse_actor_count, metavar="N|MIN,MAX"),
    Flag("device", "auto: one GPU per actor when the cluster has GPUs or its autoscaler can add GPU nodes, else CPU",
         choices=DEVICE_CHOICES),
    Flag("gpu_wait_s", "fail if no GPU actor starts in this time"),
    Flag("progress", "no progress bar", name="--no-progress", const=False),
)


def _run_sample(args: argparse.Namespace) -> int:
    from pipelines.sample_job import run_sampling

    result = run_sampling(absolute_paths(config_from_args(args), args), loader=load_exported_model)
    emit_json({"out": result.out, "num_samples": result.num_samples, "parts": result.parts,
               "sampled_parts": result.sampled_parts, "samples_npz": result.samples_npz})
    return 0


def _add_sample(subparsers: argparse._SubParsersAction) -> None:
    from pipelines.sample_job import SampleConfig

    p = subparsers.add_parser("sample", help="class-conditional samples from an exported DiT^DH + decoder",
                              description="Sample as a Ray Data job: one actor per GPU (CPU when the cluster has "
                                          "none), parts written atomically, rerun the same command to resume. "
                                          "Writes the ADM evaluation suite's samples.npz. "
                                          "Config: pipelines.sample_job.SampleConfig.")
    add_config_arguments(p, SampleConfig, SAMPLE_FLAGS, paths=("dit", "decoder", "out", "guide"))
    p.set_defaults(func=_run_sample)


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_sample(subparsers)
