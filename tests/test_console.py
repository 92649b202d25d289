"""The console of the commands that start Ray: their own lines on the terminal, Ray's in a log file the
first line names; an error names that file; --verbose and RAE_VERBOSE=1 route nothing. Each case runs
in a process of its own, as a user's command does (routing moves the process's file descriptors)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("RAE_VERBOSE", "RAE_DEBUG")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=dict(environment, PYTHONPATH=str(Path(__file__).parents[1]), **env))


def _named_log(stdout: str) -> Path:
    match = re.fullmatch(r"Ray's log: (\S+) \(--verbose shows it here\)", stdout.splitlines()[0])
    assert match, stdout
    return Path(match.group(1))


ROUTED = textwrap.dedent("""
    import logging, os, sys
    from pathlib import Path
    from jobs import console
    from jobs.cli.app import show_our_log_lines

    show_our_log_lines()
    with console.routed_to_log(Path(sys.argv[1])):
        print("our summary line")
        os.write(1, b"a C++ line on fd 1\\n")
        os.write(2, b"a C++ line on fd 2\\n")
        sys.stderr.write("a Python line on sys.stderr\\n")
        logging.getLogger("ray.data").warning("a ray logger's line")
        logging.getLogger("pipelines.encode").info("our log line")
    print("after: stdout as before")
    os.write(2, b"after: fd 2 as before\\n")
""")


def test_routed_lines_go_to_the_log_and_ours_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "run.log"
    done = _run(["-c", ROUTED, str(log)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"Ray's log: {log} (--verbose shows it here)", "our summary line",
                                        "after: stdout as before"]
    assert done.stderr.splitlines() == ["our log line", "after: fd 2 as before"]
    held = log.read_text()
    for line in ("a C++ line on fd 1", "a C++ line on fd 2", "a Python line on sys.stderr", "a ray logger's line"):
        assert line in held
    assert "our summary line" not in held and "after" not in held


WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import ray
    from jobs import console
    from jobs.demo.run import start_local_ray
    from jobs.train import progress

    @ray.remote(num_cpus=0)
    def rank0(sink):
        print("a worker's own print")
        progress.send_to(sink)
        progress.say("[run] a line of ours")
        for step in (1, 2):
            progress.say(f"[run] step {step}/2", run="run", step=step, total=2, postfix=f"loss={step}")
        return True

    with console.routed_to_log(Path(sys.argv[1])):
        start_local_ray(num_cpus=1)
        with console.worker_progress() as sink:
            assert ray.get(rank0.remote(sink))
        ray.shutdown()
""")


@pytest.mark.slow
def test_a_workers_lines_go_to_the_log_and_rank0_progress_to_the_terminal(tmp_path):
    log = tmp_path / "run.log"
    done = _run(["-c", WORKER, str(log)], tmp_path, RAY_DEDUP_LOGS="0")
    assert done.returncode == 0, done.stderr + log.read_text()
    assert "[run] a line of ours" in done.stderr
    assert re.search(r"(^|\r)run: 100%\|.*\| 2/2 .*loss=2", done.stderr, flags=re.MULTILINE), done.stderr
    assert "a worker's own print" not in done.stdout + done.stderr
    assert "a worker's own print" in log.read_text()  # forwarded by Ray, kept in the file


def test_an_error_names_the_full_log(tmp_path):
    done = _run(["-m", "jobs.cli", "encode", "--shards", str(tmp_path / "missing"), "--store",
                 str(tmp_path / "store"), "--device", "cpu"], tmp_path)
    assert done.returncode == 2, done.stderr
    log = _named_log(done.stdout)
    assert log.parent == tmp_path / "rae-logs" and log.name.startswith("rae-encode-")
    assert log.exists()
    error = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"rae encode: error: .*missing.* \(full log: {re.escape(str(log))}\)", error), error


@pytest.mark.parametrize("before, after, env", [(["--verbose"], [], {}), ([], ["--verbose"], {}),
                                               ([], [], {"RAE_VERBOSE": "1"})])
def test_verbose_routes_nothing(tmp_path, before, after, env):
    done = _run(["-m", "jobs.cli", *before, "encode", *after, "--shards", str(tmp_path / "missing"), "--store",
                 str(tmp_path / "store"), "--device", "cpu"], tmp_path, **env)
    assert done.returncode == 2, done.stderr
    assert "Ray's log" not in done.stdout and "full log" not in done.stderr
    assert not (tmp_path / "rae-logs").exists()
    assert re.search(r"rae encode: error: .*missing", done.stderr)


TRAIN_FAILS = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ray.train import WorkerGroupError
    from jobs import console
    from jobs.cli.train import finish_run

    def failing():
        raise WorkerGroupError("rank 0 failed", {0: RuntimeError("peer gone")})

    with console.routed_to_log(Path(sys.argv[1])):
        code = finish_run("rae train dit", "dit", "/data/runs", failing)
    sys.exit(code)
""")


def test_a_failed_training_run_says_why_on_the_terminal_and_names_the_full_log(tmp_path):
    log = tmp_path / "run.log"
    done = _run(["-c", TRAIN_FAILS, str(log)], tmp_path)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("rae train dit: error: run dit failed: worker 0: RuntimeError: peer gone; ")
    assert line.endswith(f"(RAE_DEBUG=1 shows the traceback) (full log: {log})")


def test_rank0_sends_its_lines_and_steps_to_the_drivers_queue_when_given_one(capsys):
    from jobs.console import ProgressLine
    from jobs.train import progress
    from jobs.train.metrics_logger import MetricsLogger

    class Sink(list):
        put = list.append

    sink = Sink()
    logger = MetricsLogger(run_name="dit", rank=0, total_steps=4, steps_per_epoch=2, global_batch=8,
                           log_every_steps=2)
    progress.send_to(sink)
    try:
        logger.say("fresh start")
        for step in range(1, 5):
            logger.log(step, lr=1e-3, metrics={"loss": float(step)})
    finally:
        progress.send_to(None)
    assert capsys.readouterr().out == ""
    assert sink[0] == ProgressLine("[dit] fresh start")
    bars = [(line.run, line.step, line.total) for line in sink[1:]]
    assert bars == [("dit", 2, 4), ("dit", 4, 4)]
    assert sink[-1].text.startswith("[dit] step 4/4 epoch 2.00 loss=3.5")
    assert sink[-1].postfix.startswith("epoch 2.00 loss=3.5 lr=0.001") and " img/s eta " in sink[-1].postfix
    logger.say("printed again")
    assert capsys.readouterr().out == "[dit] printed again\n"


def test_a_lost_progress_queue_does_not_stop_training_its_lines_continue_in_the_workers_log(capsys):
    """An elastic run lost the node its driver's queue lived on; rank 0's next line must not end the run."""
    from jobs.train import progress

    class DeadQueue:
        def put(self, item):
            raise RuntimeError("The actor died because its node has died.")

    progress.send_to(DeadQueue())
    try:
        progress.say("[dit] step 8/32", run="dit", step=8, total=32)
        progress.say("[dit] step 12/32", run="dit", step=12, total=32)
    finally:
        progress.send_to(None)
    assert capsys.readouterr().out == ("(the driver's progress queue is gone: RuntimeError; progress lines continue "
                                       "in this worker's log)\n[dit] step 8/32\n[dit] step 12/32\n")


def test_our_log_lines_follow_stderr_after_the_previous_one_was_closed(monkeypatch):
    """Each line goes to stderr as it is then. The stream of the line before may be closed by now
    (pytest's capture of the previous test, a routed command's terminal stream): seen as
    `ValueError: I/O operation on closed file` failing every in-process encode after the first."""
    import io
    import logging

    from jobs.cli.app import show_our_log_lines

    show_our_log_lines()
    first, second = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()  # pytest's capture is one
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("pipelines.encode").info("first line")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("pipelines.encode").info("second line")
    assert second.getvalue() == "second line\n"


def test_tests_tell_rays_forwarded_lines_from_the_commands_own():
    """A CI machine's disk over 95% full made the raylet's warning land in a captured stderr that a
    test compared whole; those tests compare the command's lines. The lines here are Ray's own
    format (its ``print_worker_logs``), so a change of that format fails this test, not CI's."""
    import io

    from ray._private.worker import print_worker_logs
    from ray_lines import is_ray_forwarded, without_ray_lines

    forwarded = io.StringIO()
    for source in ({"pid": "raylet", "ip": "10.0.0.2"},
                   {"pid": 4242, "actor_name": "MapWorker(MapBatches(EncoderActor))", "ip": "10.0.0.3"},
                   {"pid": 77, "task_name": "commit_shard_batch", "ip": "127.0.0.1", "localhost": "127.0.0.1"}):
        print_worker_logs({**source, "lines": ["/tmp/ray/session_x is over 95% full, available space: 6 GB"],
                           "is_err": True}, forwarded)
    ours = ("rae encode: error: cannot write /data/store/manifest.json: no space left on its device\n"
            "[dit] step 12/768 loss 0.41 (ema)\n"
            "Ray's log: /tmp/rae-logs/rae-encode.log (--verbose shows it here)\n")
    forwarded_lines = forwarded.getvalue().splitlines(keepends=True)
    assert len(forwarded_lines) == 3 and all(map(is_ray_forwarded, forwarded_lines)), forwarded_lines
    mixed = forwarded_lines[0] + ours.splitlines(keepends=True)[0] + "".join(forwarded_lines[1:]) \
        + "".join(ours.splitlines(keepends=True)[1:])
    assert without_ray_lines(mixed) == ours
