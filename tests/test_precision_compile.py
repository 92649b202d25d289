"""How a run computes: bf16 autocast on GPU (fp32 on CPU) unless the config says otherwise, and
transformer blocks compiled in place on GPU, leaving the module tree, its state-dict keys and its
numbers as they were. No Ray: the task is stepped directly, as on one worker."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from jobs.config_overrides import apply_overrides
from jobs.train.parallelize import compile_enabled, compute_dtype, plan_batches, shard_model
from jobs.train.dit import DiTRunConfig, DiTTask, StoreFacts
from jobs.train.loop import LoopConfig, RunContext
from rae.dit import build_dit
from rae.dit_blocks import RMSNorm
from rae.encoders import ENCODER_PRESETS
from rae.latent_spec import STATS_FILE

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

SPEC = ENCODER_PRESETS["dinov2-s-offline"].with_input_size(56).latent_spec("synthetic", stats=STATS_FILE)  # 4x4 x 384


def test_precision_auto_is_bf16_on_gpu_and_fp32_on_cpu():
    assert compute_dtype("auto", CUDA) is torch.bfloat16
    assert compute_dtype("auto", CPU) is None
    assert compute_dtype("bf16", CPU) is torch.bfloat16
    assert compute_dtype("fp32", CUDA) is None
    with pytest.raises(ValueError, match="loop.precision .* 'fp16'"):
        compute_dtype("fp16", CPU)


def test_compile_auto_is_on_for_gpu_only():
    assert compile_enabled("auto", CUDA) and not compile_enabled("auto", CPU)
    assert compile_enabled("on", CPU) and not compile_enabled("off", CUDA)
    with pytest.raises(ValueError, match="loop.compile"):
        compile_enabled("yes", CPU)


def test_precision_and_compile_are_run_config_fields():
    config = apply_overrides(DiTRunConfig(), {"loop.precision": "fp32", "loop.compile": "off"})
    assert (config.loop.precision, config.loop.compile) == ("fp32", "off")


def test_rms_norm_runs_fused_in_the_inputs_dtype_under_autocast():
    norm = RMSNorm(64, eps=1e-6)
    nn.init.normal_(norm.weight)
    x = torch.randn(4, 8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nn.RMSNorm warns when it falls back to the unfused path
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), nn.RMSNorm.forward(norm, x), atol=0.05, rtol=0.02)
    assert list(norm.state_dict()) == list(nn.RMSNorm(64).state_dict())


def _step(precision: str) -> tuple[float, set[torch.dtype]]:
    """One DiTTask step on CPU; the dtypes the trunk's linear layers computed in."""
    torch.manual_seed(0)
    loop = LoopConfig(global_batch_size=4, max_micro_batch=2, precision=precision, compile="off")
    task = DiTTask(DiTRunConfig(model="ditdh-tiny", loop=loop),
                   StoreFacts(url="memory://none", rows=64, num_classes=4, latent_spec=SPEC))
    task.setup(RunContext(rank=0, world=1, device=CPU, plan=plan_batches(4, 1, 2), steps_per_epoch=16,
                          dtype=compute_dtype(precision, CPU)))
    seen: set[torch.dtype] = set()
    task.model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    g = torch.Generator().manual_seed(1)
    batches = [{"latent": torch.randn(2, 16, 384, generator=g), "label": torch.tensor([0, 1])} for _ in range(2)]
    torch.manual_seed(2)
    return task.train_step(batches, 0, 1e-4)["loss"], seen


def test_a_bf16_step_autocasts_and_matches_fp32_to_bf16_precision():
    loss32, dtypes32 = _step("fp32")
    loss16, dtypes16 = _step("bf16")
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert loss16 == pytest.approx(loss32, rel=0.02)


def test_compiled_blocks_keep_keys_and_numbers_and_share_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_dit("dit-tiny", latent_channels=384, grid=4, num_classes=4, depth=3)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give them weights
        for param in eager.parameters():
            param.normal_(0, 0.05)
    compiled = build_dit("dit-tiny", latent_channels=384, grid=4, num_classes=4, depth=3)
    compiled.load_state_dict(eager.state_dict())
    shard_model(compiled, compiled.blocks, CPU, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, t, y = torch.randn(2, 16, 384), torch.rand(2), torch.tensor([0, 3])
    eager.eval(), compiled.eval()
    expected = eager(x, t, y)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(compiled(x, t, y), expected, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # three blocks, one compiled graph


def _fsdp_losses(rank: int, port: int, compile: bool, queue) -> None:
    """Three AdamW steps of a DiT^DH sharded over 2 gloo ranks; rank 0 reports the losses."""
    import os

    import torch.distributed as dist

    from rae.transport import training_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_dit("ditdh-tiny", latent_channels=384, grid=4, num_classes=4)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    model = shard_model(model, [*model.blocks, *model.head_blocks], CPU, compile=compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + rank)
        loss = training_loss(model, torch.randn(2, 16, 384, generator=g), torch.tensor([0, 1]), generator=g).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if rank == 0:
        queue.put(losses)
    dist.destroy_process_group()


def test_compiled_blocks_under_fsdp2_train_like_eager_ones():
    """The GPU default on several GPUs: blocks compiled, then sharded with FSDP2 (here over gloo)."""
    import socket

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = {}
    for compile in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = context.Queue()
        ranks = [context.Process(target=_fsdp_losses, args=(r, port, compile, queue)) for r in range(2)]
        for p in ranks:
            p.start()
        results[compile] = queue.get(timeout=300)
        for p in ranks:
            p.join(timeout=60)
            assert p.exitcode == 0
    assert results[True] == pytest.approx(results[False], rel=1e-5)



@functools.cache
def _decoder_run():
    """A tiny decoder run on the offline networks."""
    from jobs.train.decoder import DecoderRunConfig, resolve_facts

    config = DecoderRunConfig(encoder="dinov2-s-offline", encoder_input_size=56, decoder="tiny",
                              perceptual="efficientnet-lite0", discriminator="dinov2-s-offline", disc_input_size=56)
    return config, resolve_facts(config)


def _decoder_task(precision: str, compile: bool = False):
    from jobs.train.decoder import DecoderTask

    task = DecoderTask(*_decoder_run())
    torch.manual_seed(0)
    task.setup(RunContext(rank=0, world=1, device=CPU, plan=plan_batches(4, 1, 2), steps_per_epoch=16,
                          dtype=compute_dtype(precision, CPU), compile=compile))
    return task


def test_a_bf16_decoder_step_autocasts_the_decoder_and_keeps_fp32_weights():
    task = _decoder_task("bf16")
    seen: set[torch.dtype] = set()
    task.decoder.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)} for _ in range(2)]
    metrics = task.train_step(batches, 0, 1e-4)
    assert seen == {torch.bfloat16} and metrics["skipped"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["rec"], rel=1e-6)  # before the GAN starts: the loss is L_rec
    assert all(p.dtype == torch.float32 for p in task.decoder.parameters())


def test_the_decoder_compiles_its_blocks_when_the_run_does():
    from rae.decoder import build_decoder

    task = _decoder_task("fp32", compile=True)
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in task.decoder.blocks)
    assert list(task.decoder.state_dict()) == list(build_decoder("tiny", **task.decoder_kwargs()).state_dict())
