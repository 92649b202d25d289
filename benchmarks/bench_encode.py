"""Encode throughput: the Ray Data encode job (``encode_to_store``) against a plain single-process
loop doing the same work (decode + ADM crop, encode, write the Parquet part and moments, finalize)
on the same machine and the same images: JPEG crops of scikit-image's photos written as shards.

Also: decode alone and encode alone, per process (which stage bounds the job here); and the Ray
job's processes, sampled: the peak of the driver's and every Ray process's resident memory summed,
how many worker processes ran, and which of them loaded torch (the commit and decode tasks need not). The GPU side
(DINOv2-B at bf16 through the same actor, and the decode cores one GPU needs) is
``benchmarks/bench_encode_gpu.py``, which needs no Ray.

    python -m benchmarks.bench_encode [--quick]
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    finish,
    PeakMemory,
    Recorder,
    alternate,
    parse_args,
    start_ray,
    write_photo_crops,
)
from benchmarks.encode_trace import OneThreadLatentEncoder, TracedLatentEncoder, trace_path
from pipelines import latent_store
from pipelines.encode import EncodeConfig, LatentEncoder, encode_to_store, plan_manifest
from pipelines.image_decode import decode_shard
from pipelines.shards import list_shards, make_shards, read_class_names
from rae.encoders import load_encoder

ENCODER = "dinov2-s-offline"


class RayProcesses:
    """Samples this process and its descendants (the raylet, Ray's workers) every ``interval`` s:
    the peak of their summed resident memory (RSS: shared pages such as libtorch count in each
    process, as the kernel's memory accounting of a node does), and every worker process seen, by
    the tasks its title named (``ray::MapBatches(commit_shard_batch)``), its peak RSS, and whether
    it mapped libtorch."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_rss, self.peak_workers = interval, 0, 0
        self.workers: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RayProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        total, workers = 0, 0
        for pid in _descendants(os.getpid()):
            rss = _read_rss(pid)
            total += rss
            title = _read_text(f"/proc/{pid}/cmdline").split("\0")[0]
            if not title.startswith("ray::"):
                continue
            workers += 1
            seen = self.workers.setdefault(pid, {"titles": set(), "peak_rss": 0, "torch": False})
            if not title.startswith("ray::IDLE"):  # the task or actor, without the method it runs
                seen["titles"].add(re.sub(r"\.[A-Za-z_]\w*$", "", title.split(" ")[0]))
            seen["peak_rss"] = max(seen["peak_rss"], rss)
            seen["torch"] = seen["torch"] or "libtorch_cpu" in _read_text(f"/proc/{pid}/maps")
        self.peak_rss = max(self.peak_rss, total)
        self.peak_workers = max(self.peak_workers, workers)

    def summary(self) -> dict:
        by_task: dict[str, dict] = {}
        for seen in self.workers.values():
            for title in sorted(seen["titles"]) or ["ray::IDLE"]:
                row = by_task.setdefault(title, {"processes": 0, "with_torch": 0, "peak_rss_mib": 0.0})
                row["processes"] += 1
                row["with_torch"] += int(seen["torch"])
                row["peak_rss_mib"] = max(row["peak_rss_mib"], round(seen["peak_rss"] / 2**20, 1))
        return {"peak_rss_sum_mib": round(self.peak_rss / 2**20, 1), "peak_worker_processes": self.peak_workers,
                "worker_processes_seen": len(self.workers), "by_task": by_task}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_text(f"/proc/{entry.name}/stat")
            if ")" in stat:
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:  # the process is gone
        return ""


def _read_rss(pid: int) -> int:
    for line in _read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def breakdown(trace: Path, start: float, end: float) -> dict:
    """Where a Ray run's wall time went, from the actor's trace."""
    events = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    trace.unlink(missing_ok=True)
    first = {e["event"]: e["t"] for e in reversed(events)}
    calls = [e for e in events if e["event"] in ("call_start", "call_end")]
    busy = sum(b["t"] - a["t"] for a, b in zip(calls[::2], calls[1::2]))
    last_end = max((e["t"] for e in events if e["event"] == "call_end"), default=end)
    first_call = min((e["t"] for e in events if e["event"] == "call_start"), default=start)
    init = next((e for e in events if e["event"] == "init_start"), {})
    imported = {"job_start_to_actor_module_import_s": init.get("module_import_start", end) - start,
                "actor_module_import_s": init.get("module_import_end", end) - init.get("module_import_start", end)}
    return {"wall_s": end - start, "first_to_last_shard_s": last_end - first_call,
            "until_actor_starts_s": first.get("init_start", end) - start, **imported,
            "actor_init_s": first.get("init_end", end) - first.get("init_start", end),
            "actor_ready_to_first_shard_s": first.get("call_start", end) - first.get("init_end", end),
            "actor_encoding_s": busy, "after_last_shard_s": end - last_end,
            "actor_threads": next((e.get("threads") for e in events if e["event"] == "init_end"), None)}


def actor_threads() -> int:
    """torch's thread count inside a ``num_cpus=1`` Ray actor (what the shipped encoder runs with)."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self) -> int:
            return torch.get_num_threads()

    probe = Probe.remote()
    try:
        return ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)


# A fresh process's start-up, as an encoder actor's (its module, then the encoder built in __init__)
# and as the encode driver's (its module); "as_before" imports timm and wandb first, as the actor's
# module did before rae.encoders deferred timm and kept wandb out of its import.
STARTUP_CODE = {
    "actor_now": "import pipelines.encoder_actor as a; a.load_encoder('dinov2-s-offline', input_size=56)",
    "actor_as_before": "import wandb, timm, pipelines.encoder_actor as a; a.load_encoder('dinov2-s-offline', input_size=56)",
    "driver_import_now": "import pipelines.encode",
    "driver_import_as_before": "import wandb, timm, pipelines.encode",
}


def fresh_process_startup(repeats: int, names: tuple[str, ...] = tuple(STARTUP_CODE)) -> dict:
    """Wall and CPU seconds of each of ``names`` (STARTUP_CODE) in a fresh interpreter, alternated, medians."""
    def one(code: str) -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return time.perf_counter() - start, cpu

    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for _ in range(repeats):
        for name in names:
            samples[name].append(one(STARTUP_CODE[name]))
    return {name: {"wall_s": statistics.median(w for w, _ in runs), "cpu_s": statistics.median(c for _, c in runs),
                   "all_wall_s": [round(w, 2) for w, _ in runs], "all_cpu_s": [round(c, 2) for _, c in runs]}
            for name, runs in samples.items()}


def fixed_cost(images: int, rates: dict, steady: dict[str, float], quick: bool) -> dict:
    """Per-job cost outside the per-image work (wall time minus images at the steady rate), what a fresh
    process spends starting as the actor (imports and the encoder's build) and as the driver (imports),
    and the job size at which the Ray job's end-to-end rate reaches 0.95 of the plain loop's, when its
    steady rate allows it."""
    walls = {"ray": images / rates["ray_data"]["median"], "plain": images / rates["plain_loop"]["median"]}
    fixed = {k: walls[k] - images / steady[k] for k in walls}
    out = {"ray_s": fixed["ray"], "plain_s": fixed["plain"],
           "fresh_process_startup": fresh_process_startup(1, ("actor_now",)) if quick else fresh_process_startup(3)}
    # (F_plain + N / r_plain) / (F_ray + N / r_ray) = 0.95, solved for N.
    margin = 1 / steady["plain"] - 0.95 / steady["ray"]
    need = 0.95 * fixed["ray"] - fixed["plain"]
    out["images_for_end_to_end_ratio_0_95"] = need / margin if margin > 0 else None
    return out


def plain_encode(config: EncodeConfig, timings: dict[str, float]) -> int:
    """The encode job as one loop in this process, through the pipeline's own functions."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    shards = list_shards(config.shards)
    class_names = read_class_names(shards)
    reference = load_encoder(config.encoder, input_size=config.encoder_input_size, device="cpu")
    manifest = plan_manifest(config, reference, shards, class_names)
    latent_store.write_manifest(config.store, manifest)
    actor = LatentEncoder(config.encoder, config.encoder_weights, config.encoder_input_size, config.flip,
                          config.latent_dtype, config.batch_size, reference.weights_digest)
    lap("setup_s")
    for index, shard in enumerate(shards):
        decoded = decode_shard(shard, image_size=reference.spec.image_size, limits=config.limits,
                               num_classes=len(class_names))
        lap("decode_s")
        latents = actor.encode(decoded.images)
        lap("encode_s")
        latent_store.write_shard(config.store, manifest, index, keys=decoded.keys, labels=decoded.labels,
                                 latents=latents, rejected=decoded.rejected)
        lap("write_s")
    rows = int(latent_store.finalize(config.store, manifest)["rows"])
    lap("finalize_s")
    return rows


def stage_rates(shards_url: str, input_size: int, batch_size: int, threads: list[int]) -> dict:
    """Images/s of decode alone (one process, one core) and of encode alone at each thread count."""
    shards = list_shards(shards_url)
    image_size = load_encoder(ENCODER, input_size=input_size).spec.image_size
    start = time.perf_counter()
    images = [decode_shard(s, image_size=image_size).images for s in shards]
    count = sum(len(x) for x in images)
    out = {"decode_images_per_s_1core": count / (time.perf_counter() - start)}
    actor = LatentEncoder(ENCODER, None, input_size, False, "float16", batch_size,
                          load_encoder(ENCODER, input_size=input_size).weights_digest)
    previous = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        actor.encode(images[0][:2])  # warm-up
        start = time.perf_counter()
        for x in images:
            actor.encode(x)
        out[f"encode_images_per_s_{n}threads"] = count / (time.perf_counter() - start)
    torch.set_num_threads(previous)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    config = {"encoder": ENCODER, "input_size": 56 if quick else 224, "images": 16 if quick else 192,
              "images_per_shard": 8 if quick else 24, "batch_size": 8 if quick else 24, "flip": False,
              "repeats": 1 if quick else 2, "photo_crops": "skimage.data photos, random crops 160-480 px, JPEG q90",
              "memory": "peak PSS; ray: driver + raylet + workers; plain: driver"}
    rec = Recorder("encode", args, config)
    work = Path(tempfile.mkdtemp(prefix="rae-bench-encode-"))
    started_ray = False
    try:
        src = write_photo_crops(work / "images", config["images"])
        shards = f"file://{work}/shards"
        make_shards(str(src), shards, max_count=config["images_per_shard"], progress=False)
        started_ray = start_ray()
        trace = trace_path()
        trace.unlink(missing_ok=True)
        counter = iter(range(10**6))

        if not quick:  # a worker process start: seconds on a loaded machine
            rec.add("torch_threads", {"driver": torch.get_num_threads(), "ray_actor_num_cpus_1": actor_threads()})

        def run(kind: str, record: bool = True) -> float:
            store = f"file://{work}/store-{kind}-{next(counter)}"
            cfg = EncodeConfig(shards=shards, store=store, encoder=ENCODER, encoder_input_size=config["input_size"],
                               batch_size=config["batch_size"], flip=config["flip"], device="cpu", progress=False)
            start, wall_start = time.perf_counter(), time.time()
            timings: dict[str, float] = {}
            with PeakMemory(tree=kind != "plain") as memory, RayProcesses() as processes:
                if kind == "plain":
                    rows = plain_encode(cfg, timings)
                else:
                    cls = OneThreadLatentEncoder if kind == "ray_one_thread" else TracedLatentEncoder
                    rows = encode_to_store(cfg, encoder_cls=cls).rows
            elapsed = time.perf_counter() - start
            if rows != config["images"]:
                raise RuntimeError(f"{kind} encoded {rows} rows, expected {config['images']}")
            if kind != "plain":
                timings = breakdown(trace, wall_start, time.time())
                steady = timings["first_to_last_shard_s"]
            else:  # the same span: decoding, encoding and writing the shards
                steady = timings["decode_s"] + timings["encode_s"] + timings["write_s"]
            if not record:
                return 0.0
            steady_rates.setdefault(kind, []).append(config["images"] / steady)
            where.setdefault(kind, []).append({k: round(v, 2) if isinstance(v, float) else v
                                               for k, v in timings.items()})
            peaks.setdefault(kind, []).append(memory.peak_mib)
            if kind == "ray":
                ray_processes.append(processes.summary())
            return config["images"] / elapsed

        peaks: dict[str, list[float]] = {}
        ray_processes: list[dict] = []
        where: dict[str, list[dict]] = {}
        steady_rates: dict[str, list[float]] = {}
        if not quick:  # untimed: Ray's first run starts its worker processes cold (imports, caches)
            for kind in ("ray", "ray_one_thread", "plain"):
                run(kind, record=False)
        rates = alternate({"ray_data": lambda: run("ray"), "ray_data_one_thread_actor": lambda: run("ray_one_thread"),
                           "plain_loop": lambda: run("plain")}, config["repeats"])
        rec.add("images_per_s", rates)
        plain = rates["plain_loop"]["median"]
        rec.add("ratio_ray_over_plain", rates["ray_data"]["median"] / plain)
        rec.add("ratio_ray_one_thread_actor_over_plain", rates["ray_data_one_thread_actor"]["median"] / plain)
        rec.add("time_breakdown", where)
        steady = {k: float(np.median(v)) for k, v in steady_rates.items()}
        rec.add("steady_images_per_s", steady)
        rec.add("steady_ratio_ray_over_plain", steady["ray"] / steady["plain"])
        rec.add("steady_ratio_ray_one_thread_actor_over_plain", steady["ray_one_thread"] / steady["plain"])
        rec.add("peak_host_pss_mib", {k: max(v) for k, v in peaks.items()})
        rec.add("ray_job_processes", ray_processes)
        rec.add("fixed_cost", fixed_cost(config["images"], rates, steady, quick))
        stages = stage_rates(shards, config["input_size"], config["batch_size"], threads=[1, 2])
        rec.add("stages", stages)
    finally:
        finish(work, started_ray)
    rec.write()


if __name__ == "__main__":
    main()
