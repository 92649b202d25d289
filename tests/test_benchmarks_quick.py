"""Every benchmark's ``--quick`` mode runs and writes a consistent result record.

Benchmarks are not tests of speed: these check that each still runs against the current code, that
its JSON holds the record every result needs (device, versions, config, date, load average at start
and end), that derived numbers agree with the measurements they come from, and that GPU-only parts
are recorded as not run, with the reason, on a machine without CUDA. One Ray instance is shared by
the benchmarks that use a local one; the scaling benchmark's
simulated cluster runs only in its full mode.
"""
from __future__ import annotations

import json
import os

import pytest
import ray
import torch

from benchmarks import (
    bench_decoder_train,
    bench_dit_gpu,
    bench_encode,
    bench_encode_gpu,
    bench_memory,
    bench_sampling,
    bench_scaling,
    bench_store_read,
    bench_train_step,
)
from benchmarks.common import start_ray
from benchmarks.flops import config_of, forward_flops_per_image

pytestmark = pytest.mark.slow
RECORD_KEYS = {"name", "quick", "date", "device", "versions", "config", "loadavg_start", "loadavg_end",
               "results", "not_run", "wall_s"}


@pytest.fixture(scope="module")
def shared_ray():
    start_ray()
    yield
    ray.shutdown()


def run_quick(module, tmp_path) -> dict:
    out = tmp_path / "result.json"
    module.main(["--quick", "--out", str(out)])
    record = json.loads(out.read_text())
    assert RECORD_KEYS <= set(record), sorted(RECORD_KEYS - set(record))
    assert record["quick"] is True
    assert len(record["loadavg_start"]) == 3 and len(record["loadavg_end"]) == 3
    assert record["versions"]["ray"] == ray.__version__
    return record


def median(entry: dict) -> float:
    return entry["median"]


def test_encode_quick_compares_ray_with_the_plain_loop(shared_ray, tmp_path):
    record = run_quick(bench_encode, tmp_path)
    results = record["results"]
    rates = results["images_per_s"]
    assert all(median(rates[k]) > 0 for k in ("ray_data", "ray_data_one_thread_actor", "plain_loop"))
    assert results["ratio_ray_over_plain"] == pytest.approx(median(rates["ray_data"]) / median(rates["plain_loop"]))
    breakdown = results["time_breakdown"]["ray"][0]
    assert 0 < breakdown["actor_encoding_s"] <= breakdown["wall_s"]
    # The actor's start, by phase: its module's import (torch; timm waits for the encoder's build in __init__).
    assert 0 < breakdown["actor_module_import_s"] and 0 < breakdown["actor_init_s"] < breakdown["wall_s"]
    assert results["fixed_cost"]["fresh_process_startup"]["actor_now"]["cpu_s"] > 0
    # The shipped CPU actor takes the cluster's CPUs (2 here) for its one actor, not Ray's one thread.
    assert breakdown["actor_threads"] == min(2, len(os.sched_getaffinity(0)))
    assert results["time_breakdown"]["ray_one_thread"][0]["actor_threads"] == 1
    # The job's processes, sampled every 0.2 s: the CPU tasks' worker processes (decode, and the
    # commits, which Ray runs in the same reused processes) never load torch (this test runs first in
    # the module, so no earlier job's torch-loaded worker is there to be reused). A commit takes a few
    # milliseconds on a quiet machine, so its own title is caught only sometimes; the process is not.
    processes = results["ray_job_processes"][0]
    cpu_tasks = {title: row for title, row in processes["by_task"].items() if title.startswith("ray::MapBatches(")}
    assert "ray::MapBatches(decode_shard_batch)" in cpu_tasks, processes
    assert all(row["processes"] >= 1 and row["with_torch"] == 0 for row in cpu_tasks.values()), processes
    assert processes["by_task"]["ray::MapWorker(MapBatches(TracedLatentEncoder))"]["with_torch"] == 1
    assert processes["peak_rss_sum_mib"] >= max(row["peak_rss_mib"] for row in cpu_tasks.values()) > 0


def test_train_step_quick_times_ray_and_plain_on_the_same_task(shared_ray, tmp_path):
    results = run_quick(bench_train_step, tmp_path)["results"]
    times = results["step_s"]
    assert all(median(times[k]) > 0 for k in ("plain_loop", "ray_1_worker"))
    assert results["ratio_ray_1_worker_over_plain"] == pytest.approx(
        median(times["ray_1_worker"]) / median(times["plain_loop"]))
    assert results["details"]["ray_1_worker"][0]["worker_threads"] == 1


def test_store_read_quick_measures_every_path_against_raw_bytes(shared_ray, tmp_path):
    results = run_quick(bench_store_read, tmp_path)["results"]
    fractions = results["fraction_of_raw"]
    assert fractions["raw_bytes"] == 1.0
    assert {"read_latents_float16", "latent_dataset_iter_torch_batches_normalized"} <= set(fractions)
    assert all(v > 0 for v in fractions.values())


def test_memory_quick_predicts_training_state_of_a_small_model(tmp_path):
    results = run_quick(bench_memory, tmp_path)["results"]
    check = results["cpu_check_fp32"]
    # 20 bytes per parameter: weights, gradients, AdamW's two moments and the EMA shadow, 4 each.
    assert check["held_bytes"]["weights"] == 4 * check["params"]
    assert check["state_bytes_measured"] == pytest.approx(check["state_bytes_predicted"], rel=0.01)
    xl = results["analytic_80gb"]["ditdh-xl"]
    assert xl["state_gb"] == pytest.approx(20 * xl["params"] / 1e9)
    assert xl["max_micro_batch_fsdp_8_gpus"] >= xl["max_micro_batch_no_fsdp"] >= 1


def test_dit_gpu_quick_flops_match_the_counter_and_gpu_part_is_marked(tmp_path):
    record = run_quick(bench_dit_gpu, tmp_path)
    row = record["results"]["flops_crosscheck"]["ditdh-tiny"]
    assert row["analytic_forward_gflops"] == pytest.approx(row["counted_forward_gflops"], rel=1e-9)
    assert row["counted_train_gflops"] == pytest.approx(row["analytic_train_gflops"], rel=0.05)
    if not torch.cuda.is_available():
        assert "no CUDA" in record["not_run"]["throughput"]
        assert "throughput" not in record["results"]
        step = record["results"]["cpu_trainer_step"]  # the measured path itself still runs
        assert step["accum_steps"] == 2 and step["images_per_s"] > 0
        cfg = config_of("ditdh-tiny", grid=4, latent_channels=384)  # the CPU step's latent
        assert step["tflops"] == pytest.approx(step["images_per_s"] * 3 * forward_flops_per_image(cfg) / 1e12,
                                               rel=1e-6)


def test_decoder_train_quick_compares_the_trainer_step_with_the_plain_loop(tmp_path):
    record = run_quick(bench_decoder_train, tmp_path)
    step = record["results"]["cpu_step"]["reconstruction"]
    rates = step["images_per_s"]
    assert median(rates["trainer_step"]) > 0 and median(rates["plain_loop"]) > 0
    assert step["ratio_trainer_over_plain"] == pytest.approx(median(rates["trainer_step"]) / median(rates["plain_loop"]))
    assert step["trainer_tflops"] == pytest.approx(
        median(rates["trainer_step"]) * step["counted_gflops_per_image"] / 1e3)
    crops = record["results"]["crop_producer"]
    assert crops["ratio_streamed_over_whole_shard"] == pytest.approx(
        median(crops["images_per_s_one_core"]["streamed"]) / median(crops["images_per_s_one_core"]["whole_shard"]))
    assert 0 < crops["peak_traced_mib"]["streamed"] < crops["peak_traced_mib"]["whole_shard"]
    if not torch.cuda.is_available():
        assert "no CUDA" in record["not_run"]["gpu_throughput"]


def test_encode_gpu_quick_measures_decode_and_marks_the_gpu_parts(tmp_path):
    record = run_quick(bench_encode_gpu, tmp_path)
    decode = record["results"]["decode"]
    assert decode["images_per_s_1_core"] > 0 and decode["images_per_s_all_cores"] > 0
    stage = record["results"]["decode_gpu_cpu_stage"]
    assert stage["split_over_decode"] == stage["decode_gpu_split"]["median"] / stage["decode_cpu"]["median"]
    assert record["results"]["decode_gpu_pixel_difference_cpu_device"]["max"] == 0
    if not torch.cuda.is_available():
        assert {"actor", "forward", "bottleneck", "decode_gpu_device", "actor_decode_gpu"} <= set(record["not_run"])


def test_sampling_quick_runs_the_sampler_and_projects_from_the_measured_training_rate(tmp_path):
    from rae.sampling import time_grid

    record = run_quick(bench_sampling, tmp_path)
    results = record["results"]
    flops = results["flops_per_image"]
    evals = len(time_grid(50, latent_dim=16 * 16 * 768)) - 1  # the official grid: 50 points, 49 steps
    assert flops["model_evaluations"] == evals == 49
    dit, guide, decoder = (flops[f"{k}_forward_gflops"] for k in ("dit", "guide", "decoder"))
    assert dit == pytest.approx(forward_flops_per_image(config_of("ditdh-xl")) / 1e9)
    assert guide < dit and 0 < decoder < dit
    assert flops["per_sample_gflops"]["unguided"] == pytest.approx(evals * dit + decoder)
    projection = results["projection"]
    noise = projection["noise_s_per_image"]
    assert noise == results["host_noise"]["s_per_image"] > 0
    for precision in ("bf16", "fp32", "bf16_eager"):
        table = projection[precision]
        basis = projection["basis"][precision]
        for variant in bench_sampling.VARIANTS:
            row = table[variant]
            assert row["gpu_only_images_per_s"] == pytest.approx(
                basis["achieved_tflops"] * 1e3 / flops["per_sample_gflops"][variant])
            assert 1 / row["images_per_s"] == pytest.approx(1 / row["gpu_only_images_per_s"] + noise)
            assert row["gpu_hours_50k"] == pytest.approx(50_000 / row["images_per_s"] / 3600)
        unguided, autoguidance, cfg = (table[v]["gpu_only_images_per_s"] for v in bench_sampling.VARIANTS)
        # AutoGuidance adds the guide's forward to each of the 49 steps; CFG doubles the DiT's batch.
        assert unguided / autoguidance == pytest.approx((evals * (dit + guide) + decoder) / (evals * dit + decoder))
        assert unguided / cfg == pytest.approx((2 * evals * dit + decoder) / (evals * dit + decoder))
        assert 1.95 < unguided / cfg < 2
    assert projection["basis"]["bf16"]["fraction_of_measured_bf16_peak"] == pytest.approx(0.472, abs=0.001)
    rates = {p: projection[p]["unguided"]["images_per_s"] for p in ("bf16", "bf16_eager", "fp32")}
    assert rates["bf16"] > rates["bf16_eager"] > rates["fp32"]
    if not torch.cuda.is_available():
        assert "no CUDA" in record["not_run"]["throughput"]
        runs = results["cpu_sampling"]  # the measured path itself (ImageSampler, tiny models) still runs
        assert {key.split()[0] for key in runs} == set(bench_sampling.VARIANTS)
        for row in runs.values():
            assert row["images_per_s"] > 0
            assert row["image_shape"] == [row["batch"], 64, 64, 3] and row["image_dtype"] == "uint8"


def test_scaling_quick_projects_imagenet_and_says_what_it_left_out(tmp_path):
    record = run_quick(bench_scaling, tmp_path)
    assert "tests/test_cluster_path.py" in record["not_run"]["per_worker_count"]
    projection = record["results"]["imagenet_projection"]
    eight, sixty_four = projection["8_gpus"], projection["64_gpus"]
    assert eight["days_800_epochs"] == pytest.approx(10 * eight["days_80_epochs"])
    assert sixty_four["days_800_epochs"] < eight["days_800_epochs"]


def test_decoder_train_gpu_only_skips_the_cpu_comparisons_and_says_so(tmp_path):
    """What a GPU slot runs (benchmarks/run_gpu.sh): the CPU comparisons are recorded as not run, not
    silently missing, and the GPU part is measured where CUDA is, recorded as not run where it is not."""
    out = tmp_path / "result.json"
    bench_decoder_train.main(["--quick", "--gpu-only", "--out", str(out)])
    record = json.loads(out.read_text())
    assert {"cpu_step", "crop_producer"} <= set(record["not_run"])
    assert "--gpu-only" in record["not_run"]["cpu_step"]
    assert not {"cpu_step", "crop_producer"} & set(record["results"])
    if torch.cuda.is_available():
        assert record["results"]["gpu_throughput"]["variants"]
    else:
        assert "no CUDA" in record["not_run"]["gpu_throughput"]


def test_decoder_train_gpu_part_builds_the_papers_networks_from_random_weight_files(tmp_path):
    """The GPU part's networks, built here on the CPU at a small size: the trainer's own task loads the
    paper's encoder, LPIPS-VGG and discriminator from the random weight files (a GPU machine has no hub
    and no offline weight packages), and its step counts FLOPs and trains."""
    from benchmarks.bench_decoder_train import (PHASES, benchmark_facts, build_task, image_batches,
                                                paper_run_config, paper_weight_files, step_flops_per_image)
    from rae.perceptual import LPIPSVGG

    weights = paper_weight_files(tmp_path)
    config = paper_run_config(weights, decoder="tiny", encoder_size=56, disc_size=56, precision="fp32", compile="off")
    facts = benchmark_facts(config)
    assert (facts.latent_spec.encoder, facts.latent_spec.channels, facts.perceptual) == ("dinov2-b-reg4", 768, "lpips-vgg")
    task = build_task(config, facts, torch.device("cpu"), global_batch=2, micro=2)
    assert isinstance(task.loss.perceptual, LPIPSVGG)
    assert task.discriminator.config.backbone == "dino-vits8"
    batches = image_batches(task.ctx.plan.micro, task.ctx.plan.accum_steps, task.facts.crop)
    gan = PHASES["gan"]
    assert step_flops_per_image(task, batches, gan) > 0
    before = [p.detach().clone() for p in task.decoder.parameters()]
    metrics = task.train_step(batches, gan + 1, 1e-4)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, task.decoder.parameters()))
