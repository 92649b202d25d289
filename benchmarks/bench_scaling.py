"""Scaling: time per epoch against the number of Ray Train workers on a simulated multi-node Ray
cluster (``ray.cluster_utils.Cluster``: a head with no CPUs and worker nodes of 2 logical CPUs, all
on this machine), and a paper-and-pencil projection of DiT^DH-XL on ImageNet at 8 and 64 GPUs from
the one-GPU training rate bench_dit_gpu measured (an assumed 40% MFU of an H100 where it has not run).

The simulated nodes share this machine's cores, so the measured curve shows Ray's coordination
cost (gloo collectives, data split, barriers) as workers spread over nodes, not a speedup.

    python -m benchmarks.bench_scaling [--quick]
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.bench_train_step import Setup, ray_step_time, run_config
from benchmarks.common import RESULTS_DIR, Recorder, make_latent_store, parse_args
from benchmarks.flops import config_of, train_flops_per_image

IMAGENET_IMAGES = 1_281_167
H100_BF16_DENSE_PEAK = 989.4e12       # H100 SXM5, dense bf16 tensor-core FLOP/s (NVIDIA datasheet)
ASSUMED_MFU = 0.40                    # used only when bench_dit_gpu has not been run on a GPU
ASSUMED_EFFICIENCY = {8: 0.95, 64: 0.85}  # data-parallel scaling efficiency: one NVLink node, 8 nodes on IB
LATENT_BYTES = 256 * 768 * 2          # one float16 DINOv2-B latent read per image
# The trainer's GPU defaults (bf16 autocast, compiled blocks, flash SDPA, micro-batch 64).
TRAINER_DEFAULT_VARIANT = "ditdh-xl bf16 compile=on attention=flash micro=64"


def measured_gpu_rate(results_dir: Path = RESULTS_DIR) -> dict | None:
    """DiT^DH-XL training images/s on one GPU with the trainer's defaults, from bench_dit_gpu's result."""
    path = results_dir / "dit_gpu.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    row = record["results"].get("throughput", {}).get(TRAINER_DEFAULT_VARIANT)
    if not row or "images_per_s" not in row:
        return None
    return {"images_per_s": row["images_per_s"], "mfu": row["mfu"], "gpu": record["device"].get("gpu"),
            "measured": record["date"], "variant": TRAINER_DEFAULT_VARIANT, "source": "benchmarks/results/dit_gpu.json"}


def projection() -> dict:
    flops = train_flops_per_image(config_of("ditdh-xl"))
    measured = measured_gpu_rate()
    if measured:  # an H100 SXM has the H200's bf16 peak; the H200's extra memory bandwidth matters little here
        per_gpu, basis = measured["images_per_s"], {"measured_one_gpu": measured}
    else:
        per_gpu = H100_BF16_DENSE_PEAK * ASSUMED_MFU / flops
        basis = {"peak_flops_per_gpu": H100_BF16_DENSE_PEAK, "assumed_mfu": ASSUMED_MFU}
    out = {"assumptions": {"images": IMAGENET_IMAGES, "model": "ditdh-xl (256 tokens x 768)",
                           "train_flops_per_image": flops, "flops_rule": "3 x forward, analytic (benchmarks/flops.py)",
                           **basis, "scaling_efficiency": ASSUMED_EFFICIENCY, "latent_bytes_per_image": LATENT_BYTES},
           "images_per_s_per_gpu": per_gpu}
    for gpus, efficiency in ASSUMED_EFFICIENCY.items():
        rate = per_gpu * gpus * efficiency
        row = {"images_per_s": rate, "epoch_hours": IMAGENET_IMAGES / rate / 3600,
               "store_read_mb_per_s": rate * LATENT_BYTES / 1e6}
        for epochs in (80, 800):
            row[f"days_{epochs}_epochs"] = IMAGENET_IMAGES * epochs / rate / 86400
            row[f"gpu_hours_{epochs}_epochs"] = IMAGENET_IMAGES * epochs / rate * gpus / 3600
        out[f"{gpus}_gpus"] = row
    return out


def measure_worker_counts(rec: Recorder, config: dict, grid: int) -> None:
    """Epoch time for each worker count on a simulated cluster of worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.common import export_pythonpath, start_ray
    from jobs.train.dit import store_facts
    from pipelines.store_reader import open_store

    if ray.is_initialized():
        raise RuntimeError("bench_scaling starts its own simulated cluster; shut the running Ray instance down first")
    work = Path(tempfile.mkdtemp(prefix="rae-bench-scaling-"))
    export_pythonpath()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(config["worker_nodes"]):
            cluster.add_node(num_cpus=config["logical_cpus_per_node"], object_store_memory=150 * 2**20)
        start_ray(address=cluster.address)
        store = make_latent_store(f"file://{work}/store", rows=config["global_batch"] * config["steps_per_epoch"],
                                  input_size=grid * 14)
        setup = Setup(store, "ditdh-tiny", config["global_batch"], config["steps_per_epoch"], threads=1)
        facts = store_facts(open_store(store).manifest, run_config(setup), store)
        epochs = {}
        for workers in config["workers"]:
            out = ray_step_time(setup, facts, workers, work, f"scaling-{workers}")
            out["epoch_s"] = out["step_s"] * config["steps_per_epoch"]
            epochs[workers] = out
        rec.add("per_worker_count", epochs)
        base = epochs[config["workers"][0]]["epoch_s"]
        rec.add(f"epoch_s_relative_to_{config['workers'][0]}_worker",
                {w: v["epoch_s"] / base for w, v in epochs.items()})
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    grid = 4 if quick else 8
    config = {"model": "ditdh-tiny", "latent": f"{grid * grid} tokens x 384", "worker_nodes": 2,
              "logical_cpus_per_node": 2, "global_batch": 8 if quick else 32, "steps_per_epoch": 3 if quick else 16,
              "workers": [2] if quick else [1, 2, 4], "threads_per_worker": 1,
              "epoch_time": "median step interval x steps per epoch (startup excluded)"}
    rec = Recorder("scaling", args, config)
    if quick:
        # The Ray Train step it times is bench_train_step's (its --quick runs it), and the multi-node
        # path runs on a real autoscaler in tests/test_cluster_path.py: quick checks the projection only.
        rec.skip("per_worker_count", "not run in --quick: the timed Ray Train step is bench_train_step's (its "
                                     "--quick runs it) and multi-node runs are tests/test_cluster_path.py's")
    else:
        measure_worker_counts(rec, config, grid)
    rec.add("imagenet_projection", projection())
    rec.write()


if __name__ == "__main__":
    main()
