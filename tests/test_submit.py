"""`rae submit` sends a real rae command to a real Ray head and reports the job's outcome; a head that
cannot take the job (closed address, a token refused, a job agent still starting) is one line."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
from polling import wait_until
from ray_lines import without_ray_lines

from jobs.cli.app import main
from jobs.cli.submit import CONFIG_ENV_VARS, SECRET_ENV_VARS, entrypoint_for, runtime_env_for

# Generous: on a machine at load 15-45 a fresh head takes minutes to start and to run a job.
pytestmark = pytest.mark.timeout(900)
HEAD_START_TIMEOUT_S = 300
HEAD_START_ATTEMPTS = 3
HEAD_STOP_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
            if int(group) == pgid and state != "Z":
                members.append(int(stat.parent.name))
    return members


def stop_process_group(pgid: int, timeout_s: float) -> None:
    """SIGKILL every process of group ``pgid`` and return once none runs. A head's gcs_server and
    monitor outlive SIGTERM, and its agents and dashboard modules rename themselves (ray::DashboardAgent),
    so neither a polite signal nor a match on the command line ends them all: the group does."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    wait_until(lambda: not _group_members(pgid), timeout_s, f"the test head's processes (group {pgid}) to end")


def start_head(temp_dir: Path) -> tuple[str, int]:
    """Start a Ray head as a separate cluster (its own ports and temp dir) in a process group of its own,
    which every process it starts stays in; its job server's address and the group. Ray gives a
    starting head's raylet a fixed 30 s to register (ray/_private/node.py), which a loaded machine can
    miss: such a start is ended whole and tried again, up to HEAD_START_ATTEMPTS times."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # The job's entrypoint runs `python`: make it this environment's, as a cluster's setup does.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    failures = []
    for _ in range(HEAD_START_ATTEMPTS):
        dashboard_port = _free_port()
        start = subprocess.Popen(
            [ray_cli, "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
             "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = start.communicate(timeout=HEAD_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            start.kill()
            out, _ = start.communicate()
        if start.returncode == 0:
            return f"http://127.0.0.1:{dashboard_port}", start.pid
        stop_process_group(start.pid, HEAD_STOP_TIMEOUT_S)
        failures.append(out.strip().splitlines()[-1] if out.strip() else f"exit code {start.returncode}")
    pytest.fail(f"no Ray head started in {HEAD_START_ATTEMPTS} attempts: {failures}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of its own; every process of it ended afterwards (`ray stop` would stop every Ray
    on the machine)."""
    address, group = start_head(tmp_path_factory.mktemp("rayhead"))
    try:
        yield address
    finally:
        stop_process_group(group, HEAD_STOP_TIMEOUT_S)


@contextlib.contextmanager
def fake_job_server(agent_refusals: int = 0, token_required_on: tuple[str, ...] = ()) -> Iterator[dict]:
    """A loopback HTTP server answering the job API calls `rae submit --no-upload` makes, the way a
    Ray head does in a given state: 401 (Ray's token middleware) on the paths in ``token_required_on``,
    and Ray's "No available agent" 500 to the first ``agent_refusals`` submissions (a head whose job
    agent is still starting), then the job accepted. Yields ``{"address", "seen": {"submissions"}}``."""
    seen = {"submissions": 0}

    class Head(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in token_required_on:
                self.reply(401, "Unauthorized: missing authentication token")
            elif self.path == "/api/version":
                self.reply(200, json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "fake"}))
            else:
                self.reply(404, f"{self.path} is not served here")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path in token_required_on:
                self.reply(401, "Unauthorized: missing authentication token")
            elif self.path == "/api/jobs/":
                seen["submissions"] += 1
                if seen["submissions"] <= agent_refusals:
                    self.reply(500, "No available agent to submit job, please try again later.")
                else:
                    self.reply(200, json.dumps({"job_id": "raysubmit_fake", "submission_id": "raysubmit_fake"}))
            else:
                self.reply(404, f"{self.path} is not served here")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Head)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"address": f"http://127.0.0.1:{server.server_address[1]}", "seen": seen}
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _one_line_error(capsys) -> str:
    err = without_ray_lines(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("rae submit: error: ") and "Traceback" not in err, err
    return err


def test_entrypoint_runs_the_uploaded_project_cli():
    assert entrypoint_for(["rae", "encode", "--shards", "s3://b/x y"]) == \
        "python -m jobs.cli.app encode --shards 's3://b/x y'"
    with pytest.raises(ValueError, match="needs a command"):
        entrypoint_for([])
    with pytest.raises(ValueError, match="rae command"):
        entrypoint_for(["rae", "submit", "--", "rae", "models"])


def test_secrets_are_forwarded_only_when_asked():
    environ = {name: "x" for name in CONFIG_ENV_VARS + SECRET_ENV_VARS}
    plain = runtime_env_for(Path("."), forward_secrets=False, environ=environ)["env_vars"]
    assert set(plain) == set(CONFIG_ENV_VARS)
    full = runtime_env_for(Path("."), forward_secrets=True, environ=environ)["env_vars"]
    assert set(full) == set(CONFIG_ENV_VARS + SECRET_ENV_VARS)


def test_no_upload_sends_only_the_environment():
    assert runtime_env_for(None, forward_secrets=False, environ={"WANDB_MODE": "offline"}) == \
        {"env_vars": {"WANDB_MODE": "offline"}}
    assert runtime_env_for(Path("/p"), forward_secrets=False, environ={})["working_dir"] == "/p"


def test_the_default_upload_is_the_whole_project():
    """Without --working-dir the job gets the repository (its pyproject.toml and every package), so
    `python -m jobs.cli.app` runs there; a parents[] off by one once uploaded only jobs/."""
    from jobs.cli.app import build_parser

    args = build_parser().parse_args(["submit", "--", "rae", "models"])
    uploaded = Path(args.working_dir)
    assert (uploaded / "pyproject.toml").is_file()
    assert all((uploaded / package / "__init__.py").is_file() for package in ("jobs", "pipelines", "rae"))


def test_the_token_is_sent_from_the_environment_or_its_file(tmp_path):
    from jobs.cli.submit import auth_headers

    assert auth_headers({}) is None
    assert auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    (tmp_path / "token").write_text("xyz\n")
    assert auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}) == {"Authorization": "Bearer xyz"}
    with pytest.raises(FileNotFoundError, match="RAY_AUTH_TOKEN_PATH=.*missing"):
        auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_missing_address_is_a_clear_error(capsys, monkeypatch):
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["submit", "--", "rae", "models"]) == 2
    assert "--address" in capsys.readouterr().err


def test_submitted_rae_command_succeeds_on_a_local_head(ray_head, capsys):
    code = main(["submit", "--address", ray_head, "--wait", "--timeout", "600", "--agent-wait-s", "600",
                 "--", "rae", "models", "--kind", "dit", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "follow logs: ray job logs" in out
    assert '"preset": "ditdh-xl"' in out  # the job's own output, streamed back
    assert "SUCCEEDED" in out


def test_a_failing_command_fails_the_submission(ray_head, capsys):
    code = main(["submit", "--address", ray_head, "--wait", "--timeout", "600", "--agent-wait-s", "600",
                 "--", "rae", "models", "--kind", "no-such-kind"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_closed_address_is_one_line_naming_it(capsys):
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    assert main(["submit", "--address", address, "--no-upload", "--", "rae", "models"]) == 2
    err = _one_line_error(capsys)
    assert f"--address {address}: no Ray job server answers there (Connection refused)" in err
    assert "ray start --head" in err and "8265" in err


def test_the_address_given_wins_over_the_environments(capsys, monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{_free_port()}")  # a closed one
    with fake_job_server() as head:
        assert main(["submit", "--address", head["address"], "--no-upload", "--", "rae", "models"]) == 0
        assert head["seen"]["submissions"] == 1
    assert f"submitted job raysubmit_fake to {head['address']}" in capsys.readouterr().out


@pytest.mark.parametrize("refused_on", [("/api/version", "/api/jobs/"), ("/api/jobs/",)],
                         ids=["on-every-call", "at-submission"])
def test_a_token_refused_is_one_line_naming_the_variable(capsys, monkeypatch, refused_on):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    with fake_job_server(token_required_on=refused_on) as head:
        assert main(["submit", "--address", head["address"], "--no-upload", "--", "rae", "models"]) == 2
    err = _one_line_error(capsys)
    assert f"the cluster at {head['address']} requires a Ray auth token" in err
    assert "export RAY_AUTH_TOKEN=<token>" in err and "ray get-auth-token" in err


def test_a_starting_job_agent_is_waited_for_and_said_so(capsys):
    with fake_job_server(agent_refusals=2) as head:
        code = main(["submit", "--address", head["address"], "--no-upload", "--agent-wait-s", "600", "--",
                     "rae", "models"])
        assert head["seen"]["submissions"] == 3
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(f"waiting up to 600 s for the job agent at {head['address']}") == 1, out
    assert "submitted job raysubmit_fake" in out


def test_a_job_agent_that_never_answers_is_one_line_after_the_wait(capsys):
    with fake_job_server(agent_refusals=10**6) as head:
        code = main(["submit", "--address", head["address"], "--no-upload", "--agent-wait-s", "1", "--",
                     "rae", "models"])
        assert head["seen"]["submissions"] >= 2  # it did retry
    assert code == 2
    err = _one_line_error(capsys)
    assert f"the job agent at {head['address']} did not answer within 1 s" in err and "--agent-wait-s" in err


def test_a_negative_agent_wait_is_refused(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--agent-wait-s", "-1", "--", "rae", "models"]) == 2
    assert "--agent-wait-s -1: must be 0 or more seconds" in _one_line_error(capsys)
