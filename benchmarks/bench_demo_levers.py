"""`rae demo`'s levers, measured: which sizes make its pictures convincing within its time budget.

Each variant is a set of `DemoConfig` overrides run through the demo itself (`run_demo`), so what is
measured is what a user gets: held-out reconstruction PSNR (beside the mean image's), class
consistency of the samples (beside chance and real held-out crops), the samples' FD in encoder space
as a multiple of the held-out real crops' FD, and the wall time of every stage. A variant that
changes only late stages starts from a copy of another variant's work directory with those stages'
markers (and training runs) removed, so the demo reuses the rest: a sampler setting costs one
sampling stage, not a whole demo. Its reused stages report the seconds they took when they ran.

The machine is shared: every variant records the load average at its start and end, and absolute
seconds are load-dependent (see benchmarks/README.md). Variants run one per invocation
(``--variant NAME``; a full one takes ~15 minutes of two cores) and are merged into one result file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, Recorder, parse_args, start_ray

STAGES = ("shards", "encode", "train_decoder", "train_dit", "sample")
OUTPUTS_OF_STAGE = {"shards": ("shards",), "encode": ("store",), "train_decoder": ("runs/decoder",),
                    "train_dit": ("runs/dit",), "sample": ("samples", "samples-unguided")}
GRID8 = {"encoder_input_size": 112, "crop_size": 128}
NO_GAN = {"disc_start_epoch": 99.0, "gan_start_epoch": 99.0}


@dataclasses.dataclass(frozen=True)
class Variant:
    """DemoConfig overrides; with ``reuse`` another variant's workdir is copied and the stages from
    ``rerun_from`` on are run again."""

    overrides: dict[str, Any]
    reuse: str | None = None
    rerun_from: str = "shards"


VARIANTS = {
    "grid4-paper-loss": Variant({}),  # the defaults before issue 17: 4x4 tokens, tau 0.8, GAN from epoch 14
    "grid8-tau0-nogan": Variant({**GRID8, "decoder_noise_tau": 0.0, **NO_GAN}),
    "grid8-tau0-nogan-cfg2": Variant({**GRID8, "decoder_noise_tau": 0.0, **NO_GAN, "cfg_scale": 2.0},
                                     reuse="grid8-tau0-nogan", rerun_from="sample"),
    "grid8-tau0-nogan-cfg4": Variant({**GRID8, "decoder_noise_tau": 0.0, **NO_GAN, "cfg_scale": 4.0},
                                     reuse="grid8-tau0-nogan", rerun_from="sample"),
}
# --quick measures the cheapest lever (the sampler's guidance) on a finished demo's models (--base):
# a whole demo, even at toy sizes, is minutes of Ray Train start-up.
QUICK_VARIANTS = {"quick-base": Variant({}, reuse="base", rerun_from="report"),
                  "quick-cfg2": Variant({"cfg_scale": 2.0}, reuse="base", rerun_from="sample")}


def prepare_workdir(root: Path, name: str, variant: Variant) -> Path:
    """The variant's workdir: fresh, or a copy of its base's with the stages from rerun_from unmarked
    (``report``: every stage reused)."""
    workdir = root / name
    if variant.reuse is None or workdir.exists():
        return workdir
    base = (root / variant.reuse).resolve()
    if not (base / "stages" / "sample.json").exists():
        raise FileNotFoundError(f"variant {name} reuses {variant.reuse}, which has not run in {root}: run "
                                f"--variant {variant.reuse} first")
    shutil.copytree(base, workdir, symlinks=True)
    for marker in (workdir / "stages").glob("*.json"):  # the reused stages' outputs: the copy's own
        marker.write_text(marker.read_text().replace(str(base), str(workdir.resolve())))
    for stage in STAGES[STAGES.index(variant.rerun_from):] if variant.rerun_from in STAGES else ():
        (workdir / "stages" / f"{stage}.json").unlink(missing_ok=True)
        for output in OUTPUTS_OF_STAGE[stage]:
            shutil.rmtree(workdir / output, ignore_errors=True)
    shutil.rmtree(workdir / "report", ignore_errors=True)
    return workdir


def quick_overrides(base: Path) -> dict[str, Any]:
    """Sizes that fit a finished demo's models and images (jobs/demo/photos.py's done.txt: names, crops
    per split, crop size, seed), with few samples and sampler steps."""
    report, images = base / "report" / "metrics.json", base / "images" / "done.txt"
    if not (report.exists() and images.exists()):
        raise FileNotFoundError(f"--base {base}: no report/metrics.json or images/done.txt; pass the workdir of a "
                                f"finished rae demo")
    train_per_class, val_per_class, crop_size, seed = map(int, images.read_text().split()[-4:])
    return {"classes": len(json.loads(report.read_text())["classes"]), "train_per_class": train_per_class,
            "val_per_class": val_per_class, "crop_size": crop_size, "seed": seed, "samples_per_class": 2,
            "sample_steps": 4}


def measure(root: Path, name: str, variant: Variant, base_overrides: dict[str, Any]) -> dict[str, Any]:
    from jobs.demo.run import DemoConfig, run_demo

    config = dataclasses.replace(DemoConfig(), **{**base_overrides, **variant.overrides})
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    index = run_demo(prepare_workdir(root, name, variant), config)
    metrics = json.loads((index.parent / "metrics.json").read_text())
    recon, samples = metrics["reconstruction"], metrics["samples"]
    unguided = metrics.get("samples_unguided", samples)
    return {
        "overrides": variant.overrides, "reused_from": variant.reuse, "rerun_from": variant.rerun_from,
        "psnr_db": round(recon["psnr_db"], 2), "mean_image_psnr_db": round(recon["mean_image_baseline_psnr_db"], 2),
        "class_consistency": round(samples["class_consistency"], 3),
        "class_consistency_unguided": round(unguided["class_consistency"], 3),
        "class_consistency_real_heldout": round(samples["class_consistency_real_heldout"], 3),
        "class_consistency_chance": round(samples["class_consistency_chance"], 3),
        "fd_samples": round(samples["fd_encoder_samples_vs_train"], 2),
        "fd_heldout": round(samples["fd_encoder_heldout_vs_train"], 2),
        "fd_ratio": round(samples["fd_ratio_to_heldout"], 2),
        "fd_ratio_unguided": round(unguided["fd_ratio_to_heldout"], 2),
        "stage_seconds": {k: v for k, v in metrics["timings_s"].items() if k != "this_invocation"},
        "demo_seconds": metrics["timings_s"]["total"], "this_invocation_s": round(time.perf_counter() - started, 1),
        "targets_met": metrics["targets_met"],
        "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--variant", action="append", default=[])
    extra.add_argument("--root", default="/tmp/rae-demo-levers", help="work directories of the variants")
    extra.add_argument("--base", default=None, help="--quick: a finished demo workdir whose models it re-samples")
    known, rest = extra.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(__doc__.splitlines()[0], rest)
    if args.quick and not known.base:
        raise ValueError("--quick re-samples a finished demo: pass --base WORKDIR (e.g. ./rae-demo after rae demo)")
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    names = list(variants) if args.quick or not known.variant else known.variant
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(variants)}")
    out = Path(args.out) if args.out else RESULTS_DIR / "demo_levers.json"
    previous = json.loads(out.read_text())["results"] if out.exists() and not args.quick else {}
    base_overrides = quick_overrides(Path(known.base)) if args.quick else {}
    recorder = Recorder("demo_levers", args, {"variants": {n: dataclasses.asdict(v) for n, v in variants.items()},
                                              "base_overrides": base_overrides})
    recorder.record["results"].update(previous)
    root = Path(known.root) / ("quick" if args.quick else "full")
    if args.quick:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "base").symlink_to(Path(known.base).resolve())
    root.mkdir(parents=True, exist_ok=True)
    start_ray()
    for name in names:
        recorder.add(name, measure(root, name, variants[name], base_overrides))
    recorder.skip("gpu", "the demo is sized for two CPU cores; no GPU part")
    recorder.write()


if __name__ == "__main__":
    main()
