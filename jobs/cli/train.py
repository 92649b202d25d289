"""`rae train dit|decoder`: typed run configs (paper defaults) overridden by --config YAML, the
flags below and --set key=value, launched on Ray Train. Rerunning with the same --run and --storage
resumes."""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from jobs.config_overrides import Flag, absolute_paths, add_config_arguments, command_line_fields, config_from_args
from jobs.train.launch import num_workers_argument
from jobs.user_paths import absolute_location
from rae.devices import DEVICE_CHOICES

EPOCHS_FLAG = Flag("loop.epochs", "total epochs; the LR schedule's end (optim.schedule.decay_end_epoch) moves "
                                  "with it unless that is set too")
DIT_FLAGS = (Flag("store", "latent store URL"), EPOCHS_FLAG,
             Flag("num_classes", "classes of the DiT (default: the store's class names, else its largest label + 1)",
                  type=int))
DECODER_FLAGS = (
    Flag("shards", "webdataset image shards URL"),
    Flag("encoder", "encoder preset name, see `rae models --kind encoder`"),
    Flag("encoder_weights", "local encoder weights file (.safetensors or torch)"),
    Flag("encoder_input_size", "encoder input size in px (grid = size / patch); 0: the preset's"),
    Flag("lpips_weights", "torchvision VGG16 file for LPIPS; without one (and none in the torch hub cache) the "
                          "offline EfficientNet-Lite0 perceptual loss is used"),
    Flag("disc_weights", "local weights for the discriminator backbone (offline: --set "
                         "discriminator=dinov2-s-offline)"),
    EPOCHS_FLAG,
)
WANDB_DIR_FIELD = "loop.wandb.dir"
DIT_PATHS = ("store", WANDB_DIR_FIELD)
DECODER_PATHS = ("shards", "encoder_weights", "lpips_weights", "perceptual_weights", "disc_weights", WANDB_DIR_FIELD)


def _launch_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the run goes; not part of its config (a run resumed on other workers is the same run)."""
    parser.add_argument("--run", required=True, help="run name: the id of its checkpoints and wandb run; "
                        "rerun the same name to resume")
    parser.add_argument("--storage", required=True, type=absolute_location, help="where runs live: a path or fsspec URL "
                        "(file://, s3://, gs://)")
    parser.add_argument("--num-workers", default="auto", type=num_workers_argument, metavar="auto|N|MIN,MAX",
                        help="N workers, or MIN,MAX for an elastic run that grows as nodes join and shrinks when "
                             "one is lost (the global batch stays fixed). auto (default): 1..one per GPU the "
                             "cluster can have, read from its autoscaler's node types rather than the GPUs up "
                             "now; 1 on CPU")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="auto (default): GPU workers when the cluster has GPUs or its autoscaler can add "
                             "GPU nodes, else CPU workers; gpu: fail at once on a cluster that cannot have one")
    parser.add_argument("--gpu-wait-s", type=float, default=600.0,
                        help="seconds to wait for the autoscaler to bring up the first GPU workers before "
                             "failing with its reason (default 600)")
    parser.add_argument("--resize-check-s", type=float, default=60.0,
                        help="elastic runs: seconds between checks for joined or lost nodes (default 60)")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker failures to recover from (each resumes from the last checkpoint)")


def run_config_from_args(args: argparse.Namespace) -> Any:
    """The run config of `rae train dit|decoder`. When the command line sets ``loop.epochs`` and not
    the schedule's end, the schedule is stretched to the new length (:meth:`LRSchedule.with_epochs`)."""
    config = config_from_args(args)
    named = command_line_fields(args)
    if "loop.epochs" in named and "optim.schedule.decay_end_epoch" not in named:
        schedule = config.optim.schedule.with_epochs(config.loop.epochs)
        config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, schedule=schedule))
    return config


def launch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of :func:`_launch_flags` as keyword arguments of :func:`jobs.train.launch.launch`."""
    return {"num_workers": args.num_workers, "device": args.device, "gpu_wait_s": args.gpu_wait_s,
            "resize_check_s": args.resize_check_s, "max_failures": args.max_failures}


def finish_run(command: str, run_name: str, storage: str, train: Callable[[], Any]) -> int:
    """Run ``train`` (it returns Ray's Result) and end with one line: where the export is, or why
    the run failed and where the workers' logs are (``RAE_DEBUG=1``: the traceback instead)."""
    from ray.train import TrainingFailedError

    from jobs.console import err, full_log_note
    from jobs.train.export import export_url
    from jobs.train.launch import describe_failure, worker_logs_location

    try:
        result = train()
    except TrainingFailedError as error:
        if os.environ.get("RAE_DEBUG"):
            raise
        print(f"{command}: error: run {run_name} failed: {describe_failure(error)}; the workers' logs are in "
              f"{worker_logs_location()} (RAE_DEBUG=1 shows the traceback){full_log_note()}",
              file=err())
        return 1
    step = (result.metrics or {}).get("step")
    at = f" at step {step}" if step is not None else ""
    print(f"{command}: finished run {run_name}{at}; export at {export_url(storage, run_name)}", flush=True)
    return 0


def _run_dit(args: argparse.Namespace) -> int:
    from jobs.train.dit import train_dit

    config = absolute_paths(run_config_from_args(args), args)
    return finish_run("rae train dit", args.run, args.storage,
                      lambda: train_dit(config, run_name=args.run, storage=args.storage, **launch_options(args)))


def _run_decoder(args: argparse.Namespace) -> int:
    from jobs.train.decoder import train_decoder

    config = absolute_paths(run_config_from_args(args), args)
    return finish_run("rae train decoder", args.run, args.storage,
                      lambda: train_decoder(config, run_name=args.run, storage=args.storage, **launch_options(args)))


def register(subparsers: argparse._SubParsersAction) -> None:
    from jobs.train.decoder import DecoderRunConfig
    from jobs.train.dit import DiTRunConfig

    train = subparsers.add_parser("train", help="train the decoder or the DiT^DH on Ray Train",
                                  description="Ray Train jobs (FSDP2, sharded checkpoints, resume by "
                                              "run name, rank-0 wandb when loop.wandb.project is set).")
    which = train.add_subparsers(dest="train_command", metavar="<model>", required=True)
    dit = which.add_parser("dit", help="DiT^DH flow matching on a latent store",
                           description="Run config: jobs.train.dit.DiTRunConfig (defaults: the paper's DiT^DH-XL).")
    _launch_flags(dit)
    add_config_arguments(dit, DiTRunConfig, DIT_FLAGS, paths=DIT_PATHS)
    dit.set_defaults(func=_run_dit)
    decoder = which.add_parser("decoder", help="the RAE pixel decoder (L1 + LPIPS + GAN) on image shards "
                               "through the frozen encoder",
                               description="Run config: jobs.train.decoder.DecoderRunConfig (defaults: the "
                                           "paper's ViT-XL decoder on DINOv2-B).")
    _launch_flags(decoder)
    add_config_arguments(decoder, DecoderRunConfig, DECODER_FLAGS, paths=DECODER_PATHS)
    decoder.set_defaults(func=_run_decoder)
