"""What `rae train` says before and after a run, without Ray: a run that would train nothing or has no
batch to take is refused before anything launches, naming the flag and the value; worker-count
flags say why a count is refused; the run ends with one line (where the export is, or why it
failed and where the workers' logs are); wandb writes into the run's folder."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from builders import ROWS, class_latent_store, tiny_dit_config
from ray_lines import without_ray_lines

from jobs.cli.app import main as cli_main
from jobs.cli.train import finish_run
from jobs.train.decoder import DecoderRunConfig, train_decoder
from jobs.train.dit import train_dit
from jobs.train.launch import describe_failure, with_wandb_dir
from jobs.train.loop import LoopConfig
from jobs.train.wandb_logging import WandbConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return class_latent_store(str(tmp_path_factory.mktemp("store") / "latents"))


@pytest.mark.parametrize("epochs", [0, -2])
def test_a_run_of_no_epochs_is_refused_before_launch(epochs, store, tmp_path):
    with pytest.raises(ValueError, match=rf"^--epochs {epochs} \(loop.epochs\): a run trains at least 1 epoch"):
        train_dit(tiny_dit_config(store, **{"loop.epochs": epochs}), run_name="none", storage=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=rf"^--epochs {epochs} \(loop.epochs\)"):  # before the encoder loads
        train_decoder(DecoderRunConfig(shards=str(tmp_path / "no-shards"), loop=LoopConfig(epochs=epochs)),
                      run_name="none", storage=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_negative_cpu_thread_count_is_refused_before_launch(store, tmp_path):
    with pytest.raises(ValueError, match=r"^loop.cpu_threads=-1: expected a thread count >= 1, or 0 to keep the threads Ray"):
        train_dit(tiny_dit_config(store, **{"loop.cpu_threads": -1}), run_name="none", storage=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_global_batch_larger_than_the_store_is_refused_before_launch(store, tmp_path):
    config = tiny_dit_config(store, **{"loop.global_batch_size": 2 * ROWS})
    with pytest.raises(ValueError, match=rf"^loop.global_batch_size={2 * ROWS} is larger than the rows of store "
                                         rf"{store} \({ROWS}\): an epoch would have no step; pass --set "
                                         rf"loop.global_batch_size=N with N <= {ROWS}"):
        train_dit(config, run_name="big-batch", storage=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_the_cli_says_it_in_one_line(store, tmp_path, capsys):
    code = cli_main(["train", "dit", "--run", "r", "--storage", str(tmp_path / "runs"), "--store", store,
                     "--epochs", "0"])
    err = without_ray_lines(capsys.readouterr().err)
    assert code == 2 and err == ("rae train: error: --epochs 0 (loop.epochs): a run trains at least 1 epoch; "
                                 "pass --epochs N with N >= 1\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "dit", "--run", "r", "--storage", "s", "--num-workers", "0"],
     "rae train dit: error: argument --num-workers: '0': expected auto, a worker count N >= 1, or MIN,MAX "
     "with 1 <= MIN <= MAX (an elastic run)"),
    (["train", "decoder", "--run", "r", "--storage", "s", "--num-workers", "4,2"],
     "rae train decoder: error: argument --num-workers: '4,2': expected auto, a worker count N >= 1"),
    (["encode", "--shards", "a", "--store", "b", "--num-actors", "0"],
     "rae encode: error: argument --num-actors: '0': expected an actor count N >= 1, or MIN,MAX with "
     "1 <= MIN <= MAX"),
    (["sample", "--dit", "d", "--decoder", "e", "--out", "o", "--num-actors", "many"],
     "rae sample: error: argument --num-actors: 'many': expected an actor count N >= 1"),
])
def test_a_refused_worker_count_says_why(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err, err
    assert "invalid" not in err


def test_a_finished_run_ends_with_where_its_export_is(capsys):
    result = SimpleNamespace(metrics={"step": 16, "loss": 0.1}, error=None)
    assert finish_run("rae train dit", "dit-tiny", "/data/runs", lambda: result) == 0
    assert capsys.readouterr().out == "rae train dit: finished run dit-tiny at step 16; export at /data/runs/dit-tiny/export\n"


def test_a_failed_run_ends_with_one_line_why_and_where_the_logs_are(capsys, monkeypatch):
    from ray.train import WorkerGroupError

    def failing():
        raise WorkerGroupError("rank 1 failed:\nTraceback (most recent call last):\n ...\nlong text",
                               {1: FileNotFoundError("store latents/stats.safetensors:\n no such file"),
                                0: RuntimeError("peer gone")})

    monkeypatch.delenv("RAE_DEBUG", raising=False)
    assert finish_run("rae train decoder", "dec", "s3://bucket/runs", failing) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert lines[0].startswith("rae train decoder: error: run dec failed: worker 0: RuntimeError: peer gone; "
                               "the workers' logs are in ")
    assert lines[0].endswith("logs (RAE_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("RAE_DEBUG", "1")
    with pytest.raises(WorkerGroupError):
        finish_run("rae train decoder", "dec", "s3://bucket/runs", failing)


def test_the_failure_line_names_the_workers_error_not_ray_s_wrapping():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    cause = ValueError("bad\n  store")
    wrapped = RayTaskError("train_fn", "Traceback ...\nmany lines", cause)
    assert describe_failure(WorkerGroupError("x", {3: wrapped})) == "worker 3: ValueError: bad store"
    assert describe_failure(ControllerError(OSError("disk full"))) == "OSError: disk full"
    assert describe_failure(WorkerGroupError("x", {0: RuntimeError("y" * 1000)})).endswith("y ...")


def test_wandb_writes_into_the_runs_folder_on_local_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    loop = LoopConfig(wandb=WandbConfig(project="p"))
    assert with_wandb_dir(loop, str(tmp_path / "runs"), "r").wandb.dir == str(tmp_path / "runs" / "r")
    assert with_wandb_dir(loop, f"file://{tmp_path}/runs", "r").wandb.dir == str(tmp_path / "runs" / "r")
    assert with_wandb_dir(loop, "s3://bucket/runs", "r").wandb.dir is None  # wandb's default: the worker's folder
    chosen = LoopConfig(wandb=WandbConfig(project="p", dir="/elsewhere"))
    assert with_wandb_dir(chosen, str(tmp_path), "r").wandb.dir == "/elsewhere"
    monkeypatch.setenv("WANDB_DIR", "/from-env")
    assert with_wandb_dir(loop, str(tmp_path), "r").wandb.dir is None  # wandb reads WANDB_DIR itself
