"""`rae demo`, shortened to tiny sizes: the whole chain runs, its report exists with sensible numbers,
a rerun reuses every stage, and the report's page shows its images in a real (headless) browser."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jobs.demo.run import QUICK_DEMO, check_workdir_version
from jobs.demo.photos import PHOTOS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = QUICK_DEMO
# The console of `rae demo --quick`: the log file's line, a header and a time per stage, the encoder
# pool's line, one bar per long stage, the report's and the summary's lines. Measured: 23 lines up to the
# sample stage (Ray's lines on the console, as before: over 405 by the end of the decoder stage).
MOST_CONSOLE_LINES = 40


def run_rae_demo(workdir: Path) -> subprocess.CompletedProcess:
    """`rae demo --quick --workdir WORKDIR`, as a user runs it (a process and a Ray of its own)."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAE_VERBOSE", "RAE_DEBUG")}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--quick", "--workdir", str(workdir)],
                          capture_output=True, timeout=840, env=env)
    # Decoded as a terminal shows it: text=True would turn each "\r" of a progress bar's redraw into a
    # line of its own, where a terminal redraws the bar in place.
    done = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))
    assert done.returncode == 0, f"rae demo failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    done = run_rae_demo(workdir)
    (workdir / "console.txt").write_text(done.stdout + done.stderr)  # what the user saw, to look at
    return workdir, done


@pytest.fixture(scope="module")
def demo(demo_run):
    workdir, done = demo_run
    opened = re.findall(r"^\[demo\] open (.+)$", done.stdout, flags=re.MULTILINE)
    assert len(opened) == 1, done.stdout
    return workdir, Path(opened[0])


def test_the_console_is_short_and_rays_lines_are_in_the_log_it_names(demo_run):
    workdir, done = demo_run
    console = done.stdout + done.stderr
    lines = console.count("\n")  # the lines a terminal keeps: a bar's "\r" redraws stay on its line
    assert lines <= MOST_CONSOLE_LINES, console
    first = done.stdout.splitlines()[0]
    log = Path(re.fullmatch(r"Ray's log: (\S+) \(--verbose shows it here\)", first).group(1))
    assert log.parent == workdir.resolve() / "logs"
    held = log.read_text()
    for ray_line in ("execution finished", "(RayTrainWorker"):  # Ray Data's on the driver, a worker's
        assert ray_line in held
        assert ray_line not in console
    for stage in ("encode", "train_decoder", "train_dit", "sample"):
        assert f"[demo] {stage} ..." in console
    for bar in ("encode", "decoder", "dit", "sample"):  # the long stages' live bars (tqdm: rate, ETA)
        assert re.search(rf"(^|\r){bar}: .*\|.*<", console, flags=re.MULTILINE), (bar, console)


def test_report_has_every_artifact(demo):
    workdir, index = demo
    report = index.parent
    assert index == workdir.resolve() / "report" / "index.html"
    for name in ("reconstructions.png", "samples.png", "loss_curves.png", "metrics.json"):
        assert (report / name).stat().st_size > 0, name
    page = index.read_text()
    for name in ("reconstructions.png", "samples.png", "loss_curves.png"):
        assert f"src='{name}'" in page
    assert "dinov2-s-offline" in page and "cannot be told offline" in page  # the encoder's caveat


def test_metrics_are_finite_and_sensible(demo):
    _, index = demo
    metrics = json.loads((index.parent / "metrics.json").read_text())
    recon, samples = metrics["reconstruction"], metrics["samples"]
    assert 5.0 < recon["psnr_db"] < 60.0 and 5.0 < recon["mean_image_baseline_psnr_db"] < 60.0
    # Each held-out crop's own block colours beat one mean image of the training crops.
    assert recon["token_grid"] == 4 and recon["mean_image_baseline_psnr_db"] < recon["token_block_means_psnr_db"] < 60.0
    assert recon["images"] == TINY.classes * TINY.val_per_class
    assert metrics["classes"] == sorted(PHOTOS[:TINY.classes])  # labels number the sorted class folders
    assert samples["count"] == TINY.classes * TINY.samples_per_class
    assert 0.0 <= samples["class_consistency"] <= 1.0
    chance = samples["class_consistency_chance"]
    assert chance == pytest.approx(1 / TINY.classes)
    # The reference point is real: the encoder's centroids tell held-out real crops apart (measured 18/24
    # against chance 1/3; with 2 held out per class, 3/6 of this draw, too few to tell). The tiny models
    # themselves are not asserted to beat their baselines: at these sizes they do not (12.0 dB against the mean image's 13.7 dB; samples at chance), even with short
    # EMAs; learning is asserted in test_train_decoder and test_train_dit.
    assert samples["class_consistency_real_heldout"] > chance + 0.3
    for key in ("fd_encoder_samples_vs_train", "fd_encoder_heldout_vs_train"):
        assert math.isfinite(samples[key]) and samples[key] >= 0.0
    timings = metrics["timings_s"]
    assert {"shards", "encode", "train_decoder", "train_dit", "sample", "total"} <= set(timings)
    assert all(t >= 0 for t in timings.values()) and timings["total"] > 0


def test_rerun_reuses_every_stage(demo):
    workdir, index = demo
    run_rae_demo(workdir)
    metrics = json.loads((index.parent / "metrics.json").read_text())
    assert metrics["stages_reused"] == sorted(["shards", "encode", "train_decoder", "train_dit", "sample"])
    assert metrics["timings_s"]["train_dit"] > 0  # a reused stage reports the time it took when it ran


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


HARNESS = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="report" src="report/index.html" width="1200" height="900"></iframe>
<script>
document.getElementById('report').addEventListener('load', () => {
  const doc = document.getElementById('report').contentDocument;
  const images = Array.from(doc.images);
  const wait = images.map(img => img.complete ? Promise.resolve() :
      new Promise(done => { img.onload = done; img.onerror = done; }));
  Promise.all(wait).then(() => {
    document.getElementById('result').textContent = JSON.stringify(
        images.map(img => [img.getAttribute('src'), img.naturalWidth, img.naturalHeight]));
  });
});
</script></body></html>"""


def test_report_images_load_in_headless_chromium(demo, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("RAE_REQUIRE_BROWSER"):
            pytest.fail("RAE_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it")
    workdir, _ = demo
    (workdir / "harness.html").write_text(HARNESS)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(workdir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/harness.html"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout
        subprocess.run([browser, *flags, f"--screenshot={workdir / 'report' / 'screenshot.png'}",
                        "--window-size=1200,1600", url.replace("harness.html", "report/index.html")],
                       capture_output=True, timeout=120)
    finally:
        server.shutdown()
    start, end = dom.index('<pre id="result">') + len('<pre id="result">'), dom.index("</pre>")
    loaded = json.loads(dom[start:end])
    assert sorted(src for src, _, _ in loaded) == ["loss_curves.png", "reconstructions.png", "samples.png"]
    assert all(width > 0 and height > 0 for _, width, height in loaded), loaded
    assert (workdir / "report" / "screenshot.png").stat().st_size > 10_000


def test_a_workdir_of_an_older_rae_is_refused_at_once_and_a_fresh_one_stamped(tmp_path):
    from pipelines.exports import EXPORT_FORMAT

    fresh = tmp_path / "fresh"
    check_workdir_version(fresh)
    assert json.loads((fresh / "stages" / "export-format.json").read_text()) == {"export_format": EXPORT_FORMAT}
    check_workdir_version(fresh)  # its own stamp: fine
    old = tmp_path / "old"
    (old / "stages").mkdir(parents=True)
    (old / "stages" / "encode.json").write_text(json.dumps({"seconds": 1.0, "result": None}))
    with pytest.raises(ValueError, match=r"older rae \(export format before 3.*Remove it, or pass another --workdir"):
        check_workdir_version(old)


def test_every_demo_setting_belongs_to_the_stages_whose_output_it_changes():
    from jobs.demo.run import STAGE_FIELDS, DemoConfig, stage_settings

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    assert set().union(*STAGE_FIELDS.values()) == fields - {"num_workers"}  # a new setting must be placed
    assert set(stage_settings(QUICK_DEMO, "sample")) == fields - {"num_workers"}  # the samples depend on all
    assert "decoder_width" not in stage_settings(QUICK_DEMO, "train_dit")
    assert {"encoder", "seed"} <= set(stage_settings(QUICK_DEMO, "train_dit"))  # through the store it reads


def test_the_demos_decoder_trains_on_fixed_views_unless_asked_for_the_papers_random_crops():
    from jobs.demo.run import DemoConfig, decoder_run_config

    fixed = decoder_run_config(DemoConfig(), "file:///shards")
    random = decoder_run_config(DemoConfig(decoder_crops="random"), "file:///shards")
    assert (fixed.crops, random.crops) == ("center", "random")
    assert (random.resize, random.crop) == (384, 256)  # the paper's, scaled to the encoder's image size at launch
    # An epoch is a pass over the rows: two views per image on fixed views, so twice the steps.
    assert fixed.loop.checkpoint_every_steps == 2 * random.loop.checkpoint_every_steps
    with pytest.raises(ValueError, match="decoder_crops='middle'; choose one of random, center"):
        decoder_run_config(DemoConfig(decoder_crops="middle"), "file:///shards")


def test_the_demos_decoder_trains_on_squared_error_and_the_quick_demo_on_the_papers_loss():
    from jobs.demo.run import DemoConfig, decoder_run_config

    demo = decoder_run_config(DemoConfig(), "file:///shards").loss
    quick = decoder_run_config(QUICK_DEMO, "file:///shards").loss
    assert (demo.l1_weight, demo.mse_weight, demo.perceptual_weight) == (0.0, 1.0, 0.0)
    assert (quick.l1_weight, quick.mse_weight, quick.perceptual_weight) == (1.0, 0.0, 1.0)


def test_finished_stages_made_with_other_settings_are_refused_and_the_rest_reused(tmp_path):
    from jobs.demo.run import check_stage_settings, stage_settings

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "encode.json").write_text(json.dumps(
        {"seconds": 1.0, "result": {}, "settings": stage_settings(QUICK_DEMO, "encode")}))
    check_stage_settings(tmp_path, QUICK_DEMO)
    check_stage_settings(tmp_path, dataclasses.replace(QUICK_DEMO, cfg_scale=2.0))  # a later stage's setting
    with pytest.raises(ValueError, match=r"other settings \(flip_view True -> False\); .*Pass another --workdir"):
        check_stage_settings(tmp_path, dataclasses.replace(QUICK_DEMO, flip_view=False))
    (tmp_path / "stages" / "encode.json").write_text(json.dumps({"seconds": 1.0, "result": {}}))
    check_stage_settings(tmp_path, dataclasses.replace(QUICK_DEMO, flip_view=False))  # an older rae's marker


def test_a_rerun_with_another_setting_is_refused_at_once_and_changes_nothing(demo):
    workdir, index = demo
    before = {p: p.stat().st_mtime_ns for p in (workdir / "stages").glob("*.json")} | {index: index.stat().st_mtime_ns}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--quick", "--workdir", str(workdir),
                           "--set", "dit_epochs=7"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{workdir} holds a demo made with other settings (dit_epochs 6 -> 7)" in done.stderr, done.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


def _page_text(index) -> str:
    """The report's visible words, tags dropped and entities read."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", " ", index.read_text()))


def test_report_states_each_number_beside_its_baseline_and_target(demo):
    _, index = demo
    metrics = json.loads((index.parent / "metrics.json").read_text())
    recon, samples = metrics["reconstruction"], metrics["samples"]
    text = _page_text(index)
    assert f"the mean training image: {recon['mean_image_baseline_psnr_db']:.1f} dB" in text
    assert f"16-px block at its mean colour: {recon['token_block_means_psnr_db']:.1f} dB" in text
    assert (f"chance {samples['class_consistency_chance']:.3f}; real held-out crops "
            f"{samples['class_consistency_real_heldout']:.3f}") in text
    assert f"held-out real crops: {samples['fd_encoder_heldout_vs_train']:.1f}" in text
    for target in (">= 20 dB", ">= 0.5", "<= 4x held-out"):
        assert target in text
    assert samples["fd_ratio_to_heldout"] == pytest.approx(
        samples["fd_encoder_samples_vs_train"] / samples["fd_encoder_heldout_vs_train"])
    assert metrics["targets_met"] == {
        "reconstruction_psnr_at_least_20_db": recon["psnr_db"] >= 20.0,
        "class_consistency_at_least_0.5": samples["class_consistency"] >= 0.5,
        "fd_at_most_4x_heldout": samples["fd_ratio_to_heldout"] <= 4.0}
    assert "Top row: one held-out crop per class, never seen in training" in text  # what the picture is
    # The decoder's ceiling: real held-out latents decoded and scored as samples are.
    assert 0.0 <= recon["class_consistency"] <= 1.0
    assert recon["fd_ratio_to_heldout"] == pytest.approx(
        recon["fd_encoder_vs_train"] / samples["fd_encoder_heldout_vs_train"])
    assert "the decoder's ceiling for the samples" in text
    assert f"ratio {recon['fd_ratio_to_heldout']:.1f}x held-out" in text


def test_report_shows_guided_samples_beside_unguided_ones_from_the_same_noise(demo):
    import numpy as np
    from PIL import Image

    workdir, index = demo
    metrics = json.loads((index.parent / "metrics.json").read_text())
    guided, unguided = metrics["samples"], metrics["samples_unguided"]
    cfg_scale = float(guided["sampler"].rsplit("cfg ", 1)[1])
    assert cfg_scale != 1.0  # the demo guides by default, so the report can show what guidance does
    assert unguided["sampler"].endswith("no guidance") and unguided["count"] == guided["count"]
    assert 0.0 <= unguided["class_consistency"] <= 1.0 and math.isfinite(unguided["fd_encoder_samples_vs_train"])
    # The same noise (seed and labels), with and without guidance. (At these toy sizes the pictures
    # themselves may not differ: the DiT has barely learnt to use its class label.)
    settings = {folder: json.loads((workdir / folder / "sampling.json").read_text())["settings"]
                for folder in ("samples", "samples-unguided")}
    assert settings["samples"]["cfg_scale"] == cfg_scale and settings["samples-unguided"]["cfg_scale"] == 1.0
    assert settings["samples"]["seed"] == settings["samples-unguided"]["seed"]
    with np.load(workdir / "samples" / "samples.npz") as a, np.load(workdir / "samples-unguided" / "samples.npz") as b:
        assert a["arr_0"].shape == b["arr_0"].shape and np.array_equal(a["arr_1"], b["arr_1"])  # labels
    # One row per class: a real crop, then the unguided samples, then the guided ones.
    classes = len(metrics["classes"])
    grid = Image.open(index.parent / "samples.png")
    side = metrics["latent_spec"]["image_size"]
    assert grid.height >= classes * side
    assert grid.width >= (1 + 2 * guided["count"] // classes) * side
    text = _page_text(index)
    assert f"classifier-free guidance at scale {cfg_scale:g}" in text and "without guidance" in text


def test_report_keeps_stage_timings_and_says_how_the_full_size_method_differs(demo):
    _, index = demo
    text = _page_text(index)
    assert "Where the time went" in text
    for stage in ("shards", "encode", "train_decoder", "train_dit", "sample", "total"):
        assert f" {stage} " in text, stage
    assert "How the full-size method differs" in text
    for fact in ("ImageNet-1k", "DINOv2-B with 4 registers", "16x16 = 256 tokens of 768", "FID 1.51 unguided",
                 "1.13 guided"):
        assert fact in text, fact
    # the demo's side names its decoder loss and its class table, as --quick sets them
    for fact in ("L1 + 1 x perceptual, GAN from epoch 2", "L1 + LPIPS, GAN from epoch 8", "class table initialised at std 1"):
        assert fact in text, fact


def test_levers_benchmark_quick_resamples_a_finished_demo(demo, tmp_path):
    """benchmarks/bench_demo_levers.py --quick: its cheapest lever (guidance) on the demo's models."""
    from benchmarks import bench_demo_levers

    workdir, _ = demo
    out = tmp_path / "demo_levers.json"
    bench_demo_levers.main(["--quick", "--base", str(workdir), "--root", str(tmp_path / "levers"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["quick"] is True and len(record["loadavg_start"]) == 3 and len(record["loadavg_end"]) == 3
    base, cfg2 = record["results"]["quick-base"], record["results"]["quick-cfg2"]
    assert base["stage_seconds"]["train_dit"] == cfg2["stage_seconds"]["train_dit"] > 0  # reused, not rerun
    assert base["psnr_db"] == cfg2["psnr_db"]  # the same decoder
    assert cfg2["overrides"] == {"cfg_scale": 2.0}
    for row in (base, cfg2):
        assert 0.0 <= row["class_consistency"] <= 1.0 and row["fd_ratio"] >= 0.0
    assert (workdir / "stages" / "sample.json").exists()  # the base workdir is left as it was


def test_levers_benchmark_prototypes_train_score_and_time_each_lever(tmp_path):
    """The in-process prototypes behind benchmarks/README.md's lever curves, at a few steps: the
    decoder's curve (PSNR and its ceiling for samples, with the GAN phase at the end) and the DiT's
    (latent-space consistency per CFG scale at each scoring step)."""
    from benchmarks.bench_demo_levers import DecoderPrototype, DiTPrototype, measure_decoder, measure_dit

    few = {"classes": 3, "train_per_class": 8, "val_per_class": 4}
    decoder = measure_decoder(tmp_path, DecoderPrototype(width=32, depth=1, steps=4, gan_steps=2, disc_lead_steps=1,
                                                         eval_every=2, lr=2e-3, batch=8, **few))
    assert sorted(decoder["by_step"]) == [2, 4]
    for point in decoder["by_step"].values():
        assert 5.0 < point["psnr_db"] < 40.0 and 0.0 <= point["ceiling_class_consistency"] <= 1.0
        assert point["ceiling_fd_ratio"] > 0.0
    assert decoder["by_step"][4]["seconds"] > decoder["by_step"][2]["seconds"] > 0.0
    # real held-out crops, scored as the reconstructions are: the encoder tells the photographs apart
    assert decoder["class_consistency_real_heldout"] > 0.5
    assert decoder["train_images"] == 3 * 8 and decoder["val_images"] == 3 * 4
    dit = measure_dit(tmp_path, DiTPrototype(steps=4, eval_every=2, cfg_scales=(1.0, 3.0), samples_per_class=2,
                                             sample_steps=2, lr=2e-3, **few))
    assert sorted(dit["by_step"]) == [2] and sorted(dit["by_cfg_scale"]) == ["1.0", "3.0"]
    for scores in (dit["by_step"][2]["by_cfg_scale"], dit["by_cfg_scale"]):
        for scale in scores.values():
            assert 0.0 <= scale["class_consistency_latent"] <= 1.0 and scale["fd_ratio_latent"] > 0.0
    assert dit["class_consistency_real_heldout_latent"] > 0.5


def test_token_block_means_fill_each_tokens_pixels_with_their_mean_colour():
    import numpy as np

    from jobs.demo.report import psnr, token_block_means

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    blocks = token_block_means(images, 2)
    assert blocks.shape == images.shape and blocks.dtype == np.uint8
    for top in (0, 4):
        for left in (0, 4):
            window = images[:, top:top + 4, left:left + 4].astype(np.float64)
            expected = window.mean(axis=(1, 2)).round()
            assert (blocks[:, top:top + 4, left:left + 4] == expected[:, None, None, :]).all()
    assert (token_block_means(blocks, 2) == blocks).all()  # already one colour per block
    assert (psnr(images, blocks) > psnr(images, token_block_means(images, 1))).all()  # a finer grid is closer
    with pytest.raises(ValueError, match="do not divide into a 3x3 token grid"):
        token_block_means(images, 3)


def test_the_held_out_crops_do_not_move_when_the_training_set_grows(tmp_path):
    """Each class and split draws its crops from a stream of its own, so demos (and lever runs) with
    different training sizes are scored on the same held-out images, and the larger training set
    holds the smaller one's crops."""
    import numpy as np
    from PIL import Image

    from jobs.demo.photos import make_demo_images

    def pixels(folder):
        return [np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.jpg"))]

    small = make_demo_images(tmp_path / "small", classes=2, train_per_class=3, val_per_class=2, size=24)
    large = make_demo_images(tmp_path / "large", classes=2, train_per_class=6, val_per_class=2, size=24)
    assert all((a == b).all() for a, b in zip(pixels(small.val), pixels(large.val), strict=True))
    for name in small.classes:
        grown = pixels(large.train / name)
        assert len(grown) == 6
        assert all((a == b).all() for a, b in zip(pixels(small.train / name), grown[:3], strict=False))
    # and the splits are not one stream cut twice: no held-out crop is also a training crop
    assert not any((v == t).all() for v in pixels(large.val) for t in pixels(large.train))
    # cut again smaller in the same folder: the crops of the larger set do not stay behind
    again = make_demo_images(tmp_path / "large", classes=2, train_per_class=3, val_per_class=2, size=24)
    assert all((a == b).all() for a, b in zip(pixels(small.train), pixels(again.train), strict=True))
