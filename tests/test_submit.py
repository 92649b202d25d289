"""`rae submit` sends a real rae command to a real Ray head and reports the job's outcome."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli.app import main
from jobs.cli.submit import CONFIG_ENV_VARS, SECRET_ENV_VARS, entrypoint_for, runtime_env_for

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started as a separate cluster (its own ports and temp dir), stopped afterwards."""
    temp_dir = tmp_path_factory.mktemp("rayhead")
    gcs_port, dashboard_port = _free_port(), _free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    # The job's entrypoint runs `python`: make it this environment's, as a cluster's setup does.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([ray, "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    "--num-cpus=1", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dashboard_port}"
    # `ray stop` would stop every Ray on the machine; end only this head's processes.
    subprocess.run(["pkill", "-f", str(temp_dir)], check=False)
    subprocess.run(["pkill", "-f", f"--gcs-address=[^ ]*:{gcs_port}"], check=False)


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
    code = main(["submit", "--address", ray_head, "--wait", "--timeout", "180", "--",
                 "rae", "models", "--kind", "dit", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "follow logs: ray job logs" in out
    assert '"preset": "ditdh-xl"' in out  # the job's own output, streamed back
    assert "SUCCEEDED" in out


def test_a_failing_command_fails_the_submission(ray_head, capsys):
    code = main(["submit", "--address", ray_head, "--wait", "--timeout", "180", "--",
                 "rae", "models", "--kind", "no-such-kind"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out
