"""Cluster path: encode images/s and DiT training steps/s against the number of GPU nodes (1, 2, 4)
of a local autoscaling cluster (``rae cluster local``: Ray's fake provider, 2 logical CPUs and 1
logical GPU per gpu node), each job submitted with ``rae submit`` as a user would.

The simulated nodes share this machine's cores, and their GPUs have no CUDA (the actors and
workers fall back to CPU), so the ratios show what Ray's scheduling costs as work spreads over
nodes (actor and worker start-up, object transfers, gloo collectives, the per-epoch data split),
not a speedup. Per node count it records: the time for the autoscaler to bring the GPU nodes up
from zero; a no-op job's wall time (the fixed cost of a submitted job: upload, driver start,
imports); the encode and training jobs' wall times; their rates with and without that fixed cost;
and each rate relative to one node.

    python -m benchmarks.bench_cluster_nodes [--quick]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Recorder, make_latent_store, parse_args, write_photo_crops

ROOT = Path(__file__).resolve().parents[1]
ENCODER, INPUT_SIZE = "dinov2-s-offline", 56


def submit(cluster, *command: str, timeout_s: float = 1800) -> float:
    """Wall seconds of ``rae submit --wait -- rae <command>`` (submission to the job's end)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env.update(cluster.client_env())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.cli.app", "submit", "--address", cluster.address, "--no-upload", "--wait",
                           "--timeout", str(int(timeout_s)), "--", "rae", *command],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"rae {' '.join(command[:2])} failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def bring_up_gpu_nodes(cluster, count: int, timeout_s: float = 600) -> float:
    """Ask the autoscaler for ``count`` GPU nodes (a resource request, as the jobs make) and return the
    seconds until they are up; the request is then dropped and the nodes stay until idle."""
    from jobs.local_cluster import exec_inside

    script = (f"import time, ray; from ray.autoscaler.sdk import request_resources; ray.init(); t = time.time(); "
              f"request_resources(bundles=[{{'GPU': 1}}] * {count})\n"
              f"while ray.cluster_resources().get('GPU', 0) < {count}:\n"
              f"    assert time.time() - t < {timeout_s}, 'GPU nodes did not come up'; time.sleep(0.2)\n"
              f"print('UP', time.time() - t); request_resources(bundles=[])")
    done = exec_inside(cluster, [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"GPU nodes did not come up: {done.stderr[-2000:]}")
    return float(done.stdout.split("UP")[-1].split()[0])


def main(argv: list[str] | None = None) -> None:
    from jobs.local_cluster import LocalClusterSpec, preflight, running
    from pipelines.shards import make_shards

    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    config = {"gpu_nodes": [1] if quick else [1, 2, 4], "node": "2 logical CPUs (+ 1 logical GPU, no CUDA)",
              "cpu_nodes": "as many as GPU nodes", "images": 16 if quick else 192, "images_per_shard": 8,
              "encoder": f"{ENCODER} at {INPUT_SIZE} px", "train": "ditdh-tiny, global batch 16, one epoch",
              "train_steps": 8 if quick else 48, "machine_cores": os.cpu_count(),
              "rates": "work / job wall time; 'net' subtracts the no-op job's wall time (the fixed cost)"}
    rec = Recorder("cluster_nodes", args, config)
    preflight()
    work = Path(tempfile.mkdtemp(prefix="rae-bench-cluster-"))
    try:
        photos = write_photo_crops(work / "photos", config["images"], classes=4, min_side=96, max_side=160)
        shards = str(work / "shards")
        make_shards(str(photos), shards, max_count=config["images_per_shard"], progress=False)
        # One epoch of all the steps: each epoch starts a Ray Data execution across the nodes (~30 s here).
        store = make_latent_store(str(work / "latents"), rows=16 * config["train_steps"], input_size=INPUT_SIZE)
        epochs = 1
        per_nodes = {}
        for nodes in config["gpu_nodes"]:
            # 2 logical CPUs per node: an encoder actor or a train worker holds one, decoding and data
            # reading use the other (with 1, Ray Data held the decode tasks back for want of CPU budget and
            # so never asked the autoscaler for a cpu node: the job waited forever).
            spec = LocalClusterSpec(workdir=work / f"cluster-{nodes}", cpu_workers=nodes, gpu_workers=nodes,
                                    cpus_per_node=2, idle_timeout_s=600)
            with running(spec) as cluster:
                row = {"gpu_nodes_up_s": bring_up_gpu_nodes(cluster, nodes)}
                row["noop_job_s"] = submit(cluster, "models", "--kind", "dit")
                row["encode_job_s"] = submit(cluster, "encode", "--shards", shards, "--store", str(work / f"store-{nodes}"),
                                             "--encoder", ENCODER, "--encoder-input-size", str(INPUT_SIZE),
                                             "--num-actors", str(nodes), "--batch-size", "8", "--no-progress")
                row["train_job_s"] = submit(
                    cluster, "train", "dit", "--store", store, "--run", f"bench-{nodes}", "--storage",
                    str(work / f"runs-{nodes}"), "--num-workers", str(nodes), "--device", "gpu", "--epochs", str(epochs),
                    "--set", "model=ditdh-tiny", "--set", "loop.global_batch_size=16", "--set", "loop.max_micro_batch=16",
                    "--set", f"loop.checkpoint_every_steps={config['train_steps']}", "--set", "loop.log_every_steps=8")
            row["encode_images_per_s"] = config["images"] / row["encode_job_s"]
            row["encode_images_per_s_net"] = config["images"] / max(1e-6, row["encode_job_s"] - row["noop_job_s"])
            row["train_steps_per_s"] = config["train_steps"] / row["train_job_s"]
            row["train_steps_per_s_net"] = config["train_steps"] / max(1e-6, row["train_job_s"] - row["noop_job_s"])
            per_nodes[nodes] = {k: round(v, 3) for k, v in row.items()}
            rec.add(f"{nodes}_gpu_nodes", per_nodes[nodes])
        base = per_nodes[config["gpu_nodes"][0]]
        rec.add("relative_to_one_node", {
            n: {key: round(row[key] / base[key], 3) for key in
                ("encode_images_per_s", "encode_images_per_s_net", "train_steps_per_s", "train_steps_per_s_net")}
            for n, row in per_nodes.items()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec.write()


if __name__ == "__main__":
    main()
