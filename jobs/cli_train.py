"""`rae train dit|decoder`: typed run configs (paper defaults) overridden by --config YAML and
--set key=value, launched on Ray Train. Rerunning with the same --run and --storage resumes."""
from __future__ import annotations

import argparse

from jobs.config_overrides import load_config
from jobs.launch import parse_num_workers


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name: the id of its checkpoints and wandb run; "
                        "rerun the same name to resume")
    parser.add_argument("--storage", required=True, help="where runs live: a path or fsspec URL "
                        "(file://, s3://, gs://)")
    parser.add_argument("--config", help="YAML file overriding the defaults")
    parser.add_argument("--num-workers", default="1", type=parse_num_workers,
                        help="N workers, or MIN,MAX for an elastic run (the global batch stays fixed)")
    parser.add_argument("--epochs", type=int, help="total epochs (overrides loop.epochs)")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker failures to recover from (each resumes from the last checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field by dotted name, e.g. optim.schedule.base_lr=1e-4")


def _sets(args: argparse.Namespace, **fields: str) -> list[str]:
    """--set items, then the dedicated flags (which win), as dotted ``field=value`` overrides."""
    sets = list(args.set)
    for name, flag in fields.items():
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{name}={value}")
    if args.epochs is not None:
        sets.append(f"loop.epochs={args.epochs}")
    return sets


def _run_dit(args: argparse.Namespace) -> int:
    from jobs.train_dit import DiTRunConfig, train_dit

    config = load_config(DiTRunConfig(), args.config, _sets(args, store="store"))
    result = train_dit(config, run_name=args.run, storage=args.storage, num_workers=args.num_workers,
                       max_failures=args.max_failures)
    return 0 if result.error is None else 1


def _run_decoder(args: argparse.Namespace) -> int:
    from jobs.train_decoder import DecoderRunConfig, train_decoder

    config = load_config(DecoderRunConfig(), args.config, _sets(
        args, shards="shards", encoder="encoder", encoder_weights="weights",
        encoder_input_size="encoder_input_size", lpips_weights="lpips_weights", disc_weights="disc_weights"))
    result = train_decoder(config, run_name=args.run, storage=args.storage, num_workers=args.num_workers,
                           max_failures=args.max_failures)
    return 0 if result.error is None else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train the decoder or the DiT^DH on Ray Train",
                                  description="Ray Train jobs (FSDP2, sharded checkpoints, resume by "
                                              "run name, rank-0 wandb when loop.wandb.project is set).")
    which = train.add_subparsers(dest="train_command", metavar="<model>", required=True)
    dit = which.add_parser("dit", help="DiT^DH flow matching on a latent store")
    _common_flags(dit)
    dit.add_argument("--store", help="latent store URL (overrides store: in the config)")
    dit.set_defaults(func=_run_dit)
    decoder = which.add_parser("decoder", help="the RAE pixel decoder (L1 + LPIPS + GAN) on image shards "
                               "through the frozen encoder")
    _common_flags(decoder)
    decoder.add_argument("--shards", help="webdataset image shards URL (overrides shards: in the config)")
    decoder.add_argument("--encoder", help="encoder preset name (default: dinov2-b-reg4)")
    decoder.add_argument("--weights", help="local encoder weights file (.safetensors or torch)")
    decoder.add_argument("--encoder-input-size", type=int, help="encoder input size in px (grid = size / patch)")
    decoder.add_argument("--lpips-weights", help="torchvision VGG16 file for LPIPS; without one (and none in "
                         "the torch hub cache) the offline EfficientNet-Lite0 perceptual loss is used")
    decoder.add_argument("--disc-weights", help="local weights for the discriminator backbone "
                         "(offline: --set discriminator=dinov2-s-offline)")
    decoder.set_defaults(func=_run_decoder)
