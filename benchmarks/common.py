"""What every benchmark shares: the result record (device, versions, config, numbers, date, load
average), a host-memory sampler over this process and its descendants (Ray's raylet and workers),
small inputs (photo crops as shards, a latent store), and the CUDA guard for GPU-only parts.

Benchmarks are not tests: they measure. Ratios are taken side by side in one run (alternating
A/B repetitions, the median kept) because the machine is shared; absolute times mean something
only on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, argv: list[str] | None = None, *, budget: bool = False,
               gpu_only: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs (seconds)")
    parser.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/<name>.json)")
    if gpu_only:
        parser.add_argument("--gpu-only", action="store_true",
                            help="measure the GPU part only (its CPU parts are recorded under not_run)")
    if budget:
        parser.add_argument("--budget-s", type=float, default=0.0,
                            help="start no new measurement after this many seconds (0: no limit); the "
                                 "skipped ones are recorded under not_run")
    return parser.parse_args(argv)


def versions() -> dict[str, str | None]:
    from pipelines.encode import software_versions

    return {"python": platform.python_version(),
            **software_versions(("torch", "ray", "pyarrow", "timm", "pillow", "numpy"))}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    return info


def cuda_unavailable_reason() -> str | None:
    """None when CUDA is usable; else why the GPU part is skipped (recorded in the JSON)."""
    if torch.cuda.is_available():
        return None
    return (f"not run: no CUDA device on this machine ({platform.node()}, {os.cpu_count()} CPUs; "
            f"torch {torch.__version__} reports torch.cuda.is_available() == False). Run this script "
            f"on a CUDA machine for these numbers.")


class Recorder:
    """Collects one benchmark's record and writes it as JSON; load average at start and end."""

    def __init__(self, name: str, args: argparse.Namespace, config: dict[str, Any]):
        self.name, self.args = name, args
        self.record: dict[str, Any] = {
            "name": name, "quick": bool(args.quick),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info(), "versions": versions(), "config": config,
            "loadavg_start": list(os.getloadavg()), "results": {}, "not_run": {},
        }
        self.started = time.perf_counter()

    def add(self, key: str, value: Any) -> None:
        self.record["results"][key] = value
        print(f"[{self.name}] {key}: {json.dumps(value, default=str)}", flush=True)

    def skip(self, key: str, reason: str) -> None:
        self.record["not_run"][key] = reason
        print(f"[{self.name}] {key}: {reason}", flush=True)

    def write(self) -> Path:
        self.record["loadavg_end"] = list(os.getloadavg())
        self.record["wall_s"] = round(time.perf_counter() - self.started, 1)
        path = Path(self.args.out) if self.args.out else RESULTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        print(f"[{self.name}] wrote {path}", flush=True)
        return path


# ---------------------------------------------------------------- timing

def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, Any]]:
    """Run each variant ``repeats`` times in turn (A B A B ...); each call returns a rate or a time.
    Interleaving spreads the shared machine's load over all variants alike."""
    values: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            values[key].append(run())
    return {k: {"median": statistics.median(v), "all": [round(x, 4) for x in v]} for k, v in values.items()}


def steady_step_time(starts: list[float], warmup: int = 1) -> float:
    """Median interval between consecutive step starts after ``warmup`` steps (data wait included)."""
    if len(starts) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} step timestamps, got {len(starts)}")
    gaps = np.diff(np.asarray(starts[warmup:]))
    return float(np.median(gaps))


# ---------------------------------------------------------------- host memory

def _memory_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between the processes mapping them: libtorch, the
    Ray object store) when the kernel reports it, else resident set size; 0 for a process gone."""
    for name, field in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            with open(f"/proc/{pid}/{name}") as handle:
                for line in handle:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 0


def _process_tree_memory(root: int) -> int:
    """Memory of ``root`` and all its descendants (Linux /proc), PSS where available."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _memory_bytes(pid)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the memory (PSS) of this process (with ``tree``: and all its descendants, i.e. the Ray
    processes ``ray.init`` started) every ``interval`` s while active; ``peak_mib`` after."""

    def __init__(self, interval: float = 0.2, *, tree: bool = True):
        self.interval, self.peak, self.tree = interval, 0, tree
        self._measure = _process_tree_memory if tree else _memory_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._measure(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._measure(os.getpid()))

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


# ---------------------------------------------------------------- inputs

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "colorwheel", "retina", "camera", "brick", "grass", "coins")


def write_photo_crops(root: Path, count: int, *, classes: int = 4, seed: int = 0,
                      min_side: int = 160, max_side: int = 480) -> Path:
    """``count`` JPEG crops of scikit-image's bundled photos (random sizes and positions) in
    ``classes`` class folders: real photographic content, a realistic decode cost."""
    from PIL import Image

    from jobs.demo.photos import load_photo

    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in PHOTOS]
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch = int(rng.integers(min(min_side, h), min(max_side, h) + 1))
        cw = int(rng.integers(min(min_side, w), min(max_side, w) + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        Image.fromarray(np.ascontiguousarray(photo[top:top + ch, left:left + cw])).save(
            root / f"class{i % classes}" / f"img{i:05d}.jpg", quality=90)
    return root


def make_latent_store(url: str, *, rows: int, classes: int = 4, parts: int = 2, encoder: str = "dinov2-s-offline",
                      input_size: int = 56, seed: int = 0) -> str:
    """A complete latent store of class-dependent Gaussian latents shaped as ``encoder`` at ``input_size``
    makes them, written by the pipeline's own writer (so it has the real format: Parquet parts,
    manifest, statistics)."""
    from pipelines import latent_store
    from pipelines.shards import ShardInfo
    from rae.encoders import ENCODER_PRESETS
    from rae.latent_spec import STATS_FILE

    spec = ENCODER_PRESETS[encoder].with_input_size(input_size).latent_spec("synthetic", stats=STATS_FILE)
    tokens, channels = spec.shape
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, tokens, channels)).astype(np.float32)
    labels = rng.integers(0, classes, size=rows)
    shards = [ShardInfo(url=f"mem://shard-{i}.tar", name=f"shard-{i}.tar", size=1000 + i) for i in range(parts)]
    manifest = latent_store.new_manifest(
        latent_spec=spec, preprocessing={"crop": "benchmark"}, latent_dtype="float16",
        shards=shards, class_names=[f"c{i}" for i in range(classes)], software={})
    latent_store.write_manifest(url, manifest)
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    for index in range(parts):
        sl = slice(bounds[index], bounds[index + 1])
        noise = 0.3 * rng.normal(size=(sl.stop - sl.start, tokens, channels)).astype(np.float32)
        latent_store.write_shard(url, manifest, index, keys=[f"k{i}" for i in range(sl.start, sl.stop)],
                                 labels=labels[sl].tolist(),
                                 latents=(centres[labels[sl]] + noise)[:, None].astype(np.float16), rejected=[])
    latent_store.finalize(url, manifest)
    return url


def export_pythonpath() -> None:
    """Ray processes started from here inherit this environment: let them import ``benchmarks.*``."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, *paths) if p)


def start_ray(num_cpus: int = 2, object_store_mib: int = 300, address: str | None = None) -> bool:
    """A local Ray instance (or a connection to ``address``) unless one is running (a test may share
    one); True when started here."""
    import ray

    from pipelines.ray_start import init_ray

    export_pythonpath()
    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, log_to_driver=False)
    elif started:  # address="local": a new instance, never another process's cluster on this machine
        init_ray(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_mib * 2**20, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return started


def finish(work: Path, started_ray: bool) -> None:
    """Stop the Ray instance this benchmark started (not one it shares), and remove its scratch folder."""
    if started_ray:
        import ray

        ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

