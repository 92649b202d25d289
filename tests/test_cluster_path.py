"""The cluster path as a user runs it: `rae submit` to an autoscaling cluster whose GPU workers start
at 0 (the local fake-provider cluster, jobs/local_cluster.py: a CPU-only head, `cpu` and `gpu` node
types of 2 CPUs each, 0..1 cpu and 0..2 gpu nodes). The commands are the README's "From laptop to cluster" ones
with local paths; the GPUs are logical (no CUDA), so the GPU code paths fall back to CPU and gloo.

In order, on one cluster:
1. `rae encode` scales the gpu type from 0, its encoder actors run on gpu nodes (recorded per
   shard), and the store holds the encoder's output for every image; the idle gpu nodes go away.
2. `rae encode` again into a new store with a gpu node killed (its raylet, by pid) mid-way: the job
   finishes with every image once and the same latents.
3. `rae train dit --num-workers 1,2`: starts with the workers it can get, grows to 2, loses a node
   mid-run, resumes from its last checkpoint and reaches the configured final step with every step
   trained once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import class_latent_store, write_image_folder
from polling import wait_until

from jobs.local_cluster import LocalClusterSpec, alive_node_ids, raylet_pids
from pipelines.image_decode import decode_image
from pipelines.shards import make_shards
from pipelines.store_check import verify_store
from pipelines.store_reader import open_store, read_latents
from rae.encoders import load_encoder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ENCODER, INPUT_SIZE, IMAGE_SIZE = "dinov2-s-offline", 56, 64
CLASSES = ("ant", "bee", "cat")
IMAGES_PER_CLASS = 8
IDLE_TIMEOUT_S = 20.0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_cluster_spec(tmp_path_factory) -> LocalClusterSpec:
    # Two logical CPUs per node, so decoding and data reading fit beside an actor or a train worker on
    # the gpu nodes: fewer nodes (each is ~5 Ray processes) on the 2-core machine.
    return LocalClusterSpec(workdir=tmp_path_factory.mktemp("cluster"), cpu_workers=1, gpu_workers=2, cpus_per_node=2,
                            idle_timeout_s=IDLE_TIMEOUT_S)


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    measured: dict[str, float] = {}
    yield measured
    print("\ncluster path timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))


def registered_checkpoint(run_dir: Path) -> dict | None:
    """The newest checkpoint Ray Train's controller has registered for the run (its run snapshot's
    latest entry: folder name and metrics), or None before the first."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-write
        return None


def rae_submit(cluster, *command: str, timeout_s: float = 900) -> subprocess.Popen:
    """`rae submit --wait -- rae ...` in a process of its own, as a user types it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env.update(cluster.client_env())
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli.app", "submit", "--address", cluster.address, "--no-upload", "--wait",
         "--timeout", str(int(timeout_s)), "--", "rae", *command],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout_s: float = 900) -> str:
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-6000:]
    return out


def alive(cluster, node_type: str) -> list[str]:
    return alive_node_ids(cluster.workdir, node_type)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    return write_image_folder(tmp_path_factory.mktemp("images"), {
        c: {f"{c}_{i}.png": rng.integers(0, 255, (64 + 4 * i, 80 - 2 * i, 3), dtype=np.uint8)
            for i in range(IMAGES_PER_CLASS)} for c in CLASSES})


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("shards")
    make_shards(str(image_folder), str(dest), max_count=2, progress=False)  # 12 shards of 2 images
    return str(dest)


@pytest.fixture(scope="module")
def direct(image_folder) -> dict[tuple[str, int], np.ndarray]:
    """The encoder applied in this process (float32) to each image and its mirror, by (key, view)."""
    encoder = load_encoder(ENCODER, input_size=INPUT_SIZE)
    keys = [f"{c}/{c}_{i}" for c in CLASSES for i in range(IMAGES_PER_CLASS)]
    crops = [decode_image((image_folder / f"{k}.png").read_bytes(), IMAGE_SIZE) for k in keys]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        views = encoder(x).numpy(), encoder(x.flip(-1)).numpy()
    return {(k, v): views[v][i] for i, k in enumerate(keys) for v in (0, 1)}


def encode_command(shards: str, store: str) -> list[str]:
    return ["encode", "--shards", shards, "--store", store, "--encoder", ENCODER, "--encoder-input-size",
            str(INPUT_SIZE), "--flip", "--batch-size", "4", "--no-progress", "--gpu-wait-s", "300"]


def assert_store_holds_every_image_once(store: str, direct: dict) -> None:
    data = read_latents(store)
    pairs = list(zip(data["key"], data["view"]))
    assert len(pairs) == len(set(pairs)) == len(direct)  # no image missing, none twice
    assert set(pairs) == set(direct)
    for key, view, latent in zip(data["key"], data["view"], data["latent"]):
        want = direct[key, view]
        assert np.all(np.abs(latent.astype(np.float64) - want) <= 1e-3 * np.abs(want) + 1e-4), (key, view)
    assert verify_store(store).problems == []


def test_submitting_without_the_clusters_token_is_one_clear_line(local_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    done = subprocess.run([sys.executable, "-m", "jobs.cli.app", "submit", "--address", local_cluster.address,
                           "--no-upload", "--", "rae", "models"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "requires a Ray auth token" in done.stderr, done.stderr
    assert "export RAY_AUTH_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_encode_scales_gpu_nodes_from_zero_and_runs_its_actors_there(local_cluster, shards, direct, tmp_path_factory,
                                                                     timings):
    cluster = local_cluster
    assert alive(cluster, "gpu") == []
    store = str(tmp_path_factory.mktemp("stores") / "in-cluster")
    started = time.monotonic()
    job = rae_submit(cluster, *encode_command(shards, store))
    wait_until(lambda: alive(cluster, "gpu") or job.poll() is not None, 300, "a gpu node")
    timings["submit -> first gpu node"] = time.monotonic() - started
    out = finish(job)
    timings["encode job"] = time.monotonic() - started
    # The decision, made from the autoscaler's node types while no GPU was up, said once at the start.
    assert "encoder pool: 1..2 actors, 1 GPU each; GPU nodes: 0 up (0 GPUs), up to 2 of type gpu (1 GPU each)" in out
    assert "encoded 12/12 shards" in out
    parts = open_store(store).manifest["parts"]
    assert len(parts) == 12
    assert {(p["encoded_on"]["node_type"], p["encoded_on"]["device"]) for p in parts} == {("gpu", "cpu")}
    assert "12 shard(s) on node type gpu, device cpu" in out
    assert_store_holds_every_image_once(store, direct)
    # Idle GPU nodes are removed after the idle timeout.
    ended = time.monotonic()
    wait_until(lambda: not alive(cluster, "gpu"), IDLE_TIMEOUT_S + 180, "the idle gpu nodes to go")
    timings["encode end -> gpu nodes gone"] = time.monotonic() - ended


def test_encode_survives_losing_a_gpu_node_mid_way(local_cluster, shards, direct, tmp_path_factory, timings):
    cluster = local_cluster
    store = Path(tmp_path_factory.mktemp("stores") / "node-lost")
    job = rae_submit(cluster, *encode_command(shards, str(store)))
    # Once the first shard is committed, kill the raylet of a gpu node (the node is lost with its actors).
    wait_until(lambda: list(store.glob("_progress/*.json")) or job.poll() is not None, 600, "a committed shard")
    victims = raylet_pids(cluster, "gpu")
    assert victims, "no gpu node to lose"
    node_id, pid = next(iter(victims.items()))
    lost_at = time.monotonic()
    os.kill(pid, 9)
    out = finish(job)
    timings["gpu node lost -> encode done"] = time.monotonic() - lost_at
    assert "encoded 12/12 shards" in out, out[-3000:]
    assert node_id not in alive(cluster, "gpu")
    assert_store_holds_every_image_once(str(store), direct)


def test_elastic_training_grows_to_two_workers_and_survives_losing_a_node(local_cluster, tmp_path_factory, timings):
    cluster = local_cluster
    work = tmp_path_factory.mktemp("train")
    # Few epochs of many steps: each epoch starts a Ray Data execution, the slow part on 2 loaded cores.
    store = class_latent_store(str(work / "latents"), rows=256)
    storage = work / "runs"
    epochs, steps_per_epoch = 2, 16
    job = rae_submit(cluster, "train", "dit", "--store", store, "--run", "elastic", "--storage", str(storage),
                     "--num-workers", "1,2", "--resize-check-s", "5", "--gpu-wait-s", "300",
                     "--epochs", str(epochs), "--set", "model=ditdh-tiny", "--set", "ema_decay=0.9",
                     "--set", "loop.global_batch_size=16", "--set", "loop.max_micro_batch=8",
                     "--set", "loop.checkpoint_every_steps=8", "--set", "loop.log_every_steps=4",
                     "--set", "loop.shuffle_buffer=32", "--set", "optim.schedule.base_lr=3e-3",
                     "--set", "optim.schedule.final_lr=3e-4", "--set", f"optim.schedule.hold_epochs={epochs - 1}",
                     "--set", f"optim.schedule.decay_end_epoch={epochs}")
    started = time.monotonic()
    lines: list[str] = []

    def read_until(text: str):
        for line in job.stdout:
            lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the job ended before printing {text!r}:\n{''.join(lines)[-4000:]}")

    read_until("training workers: 1..2 (elastic")
    read_until("2 workers x")  # a worker group of two trains (grown from one, or both nodes up at once)
    timings["submit -> 2 workers training"] = time.monotonic() - started
    # A checkpoint's folder appears while it uploads; the run resumes from it only once Ray Train's
    # controller has registered it (written to its run snapshot). Killing a node before that is a
    # fresh start, as Ray Train defines it.
    registered = wait_until(lambda: registered_checkpoint(storage / "elastic"), 300,
                            "a checkpoint of the 2-worker run registered by Ray Train")
    node_id, pid = next(iter(raylet_pids(cluster, "gpu").items()))
    lost_at = time.monotonic()
    os.kill(pid, 9)
    resumed = read_until("resumed at step")
    assert int(resumed.split("resumed at step ")[1].split()[0]) >= registered["metrics"]["step"], resumed
    timings["node lost -> resumed"] = time.monotonic() - lost_at
    rest, _ = job.communicate(timeout=900)
    out = "".join(lines) + rest
    assert job.returncode == 0, out[-6000:]
    assert "SUCCEEDED" in out
    export = storage / "elastic" / "export"
    assert json.loads((export / "model.json").read_text())["step"] == epochs * steps_per_epoch
    history = json.loads((export / "history.json").read_text())
    steps = [entry["step"] for entry in history]
    assert steps == list(range(4, epochs * steps_per_epoch + 1, 4))  # every logged step once, none lost
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(np.isfinite(entry["loss"]) for entry in history)
