"""`rae submit`: run any rae command as a Ray job on a cluster, with this project as its working dir.

The job runs the same code path as a local run: the project directory is uploaded as the job's
working directory (minus data, environments and checkpoints), and the entrypoint is the rae command
itself, started as ``python -m jobs.cli.app ...`` so the uploaded copy is the code that runs.

Authentication: Ray >= 2.59 clusters may require a token. ``rae submit`` sends the one in
``RAY_AUTH_TOKEN``, or in the file ``RAY_AUTH_TOKEN_PATH`` names, itself (Ray's client sends a token
only when ``RAY_AUTH_MODE=token`` is set too); without either, Ray's own lookup applies
(``~/.ray/auth_token`` under ``RAY_AUTH_MODE=token``). On a cluster made by ``ray up``,
``ray get-auth-token`` on the head prints the token.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from jobs.user_paths import absolute_location

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # jobs/cli/submit.py -> the repository

# Never uploaded with the working dir: environments, caches and the artifacts runs write locally.
UPLOAD_EXCLUDES = [".venv", ".git", "**/__pycache__", ".pytest_cache", "runs", "rae-demo", "*.egg-info"]

# Forwarded from the submitting shell when set. Configuration only; see SECRET_ENV_VARS.
CONFIG_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "WANDB_MODE", "WANDB_PROJECT",
                   "WANDB_ENTITY", "HF_HUB_OFFLINE", "RAE_CACHE_DIR")
# Forwarded only with --forward-secrets: they then sit in the job's runtime env on the cluster (visible
# to whoever can read the dashboard), so prefer instance profiles / service accounts on the nodes.
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY",
                   "HF_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # --address's default, in this order
AGENT_WAIT_S = 120.0  # how long a just-started head may take to accept jobs (its agent starts after it)
AGENT_RETRY_S = 2.0


def entrypoint_for(command: list[str]) -> str:
    """The shell entrypoint for a rae command given as argv (with or without the leading 'rae')."""
    if not command:
        raise ValueError("rae submit needs a command after '--', e.g. rae submit -- rae encode --shards ...")
    if command[0] == "rae":
        command = command[1:]
    if not command or command[0] == "submit":
        raise ValueError(f"rae submit runs a rae command such as 'rae encode ...'; got {shlex.join(command)!r}")
    return shlex.join(["python", "-m", "jobs.cli.app", *command])


def runtime_env_for(working_dir: Path | None, forward_secrets: bool, environ: dict[str, str]) -> dict:
    """The job's runtime env: the forwarded variables, and ``working_dir`` uploaded as the job's working
    directory (None: nothing uploaded; the job runs the rae installed on the nodes)."""
    names = CONFIG_ENV_VARS + (SECRET_ENV_VARS if forward_secrets else ())
    env_vars = {name: environ[name] for name in names if name in environ}
    if working_dir is None:
        return {"env_vars": env_vars}
    return {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}


def auth_headers(environ: dict[str, str] | os._Environ) -> dict[str, str] | None:
    """The bearer token header from ``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH`` names; None
    when neither is set (Ray's client then applies its own rules)."""
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise FileNotFoundError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({error.strerror})") from None
    return {"Authorization": f"Bearer {token}"} if token else None


def submit(args: argparse.Namespace) -> int:
    address = args.address or next((os.environ[name] for name in ADDRESS_ENV_VARS if os.environ.get(name)), None)
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS "
                         "(after `ray up cluster.yaml`, `ray dashboard cluster.yaml` forwards it to localhost:8265)")
    if args.agent_wait_s < 0:
        raise ValueError(f"--agent-wait-s {args.agent_wait_s:g}: must be 0 or more seconds")
    entrypoint = entrypoint_for(args.rae_command)
    working_dir = None if args.no_upload else Path(args.working_dir)
    runtime_env = runtime_env_for(working_dir, args.forward_secrets, dict(os.environ))
    with cluster_errors(address):
        client = connect(address, auth_headers(os.environ))
        job_id = submit_when_agent_answers(client, address, args.agent_wait_s, dict(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.job_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
        ))
    forwarded = ", ".join(sorted(runtime_env["env_vars"])) or "none"
    print(f"submitted job {job_id} to {address}")
    print(f"  entrypoint: {entrypoint}")
    print(f"  environment forwarded (names only): {forwarded}")
    print(f"  follow logs: ray job logs --address {address} --follow {job_id}")
    print(f"  stop it:     ray job stop --address {address} {job_id}")
    if not args.wait:
        return 0
    with cluster_errors(address, following=job_id):
        return wait_for(client, job_id, timeout_s=args.timeout)


@contextlib.contextmanager
def cluster_errors(address: str, following: str | None = None) -> Iterator[None]:
    """Ray's failures to reach the cluster at ``address`` as one line each: a token the cluster
    refuses (PermissionError), no job server answering (ValueError naming the address). ``following``:
    the job already submitted, which keeps running whatever happens to this connection."""
    import ray.exceptions
    import requests

    try:
        yield
    except ray.exceptions.AuthenticationError as error:
        raise PermissionError(f"the cluster at {address} requires a Ray auth token and this shell's was not "
                              f"accepted ({' '.join(error.message.split())}): export RAY_AUTH_TOKEN=<token> (on the head, "
                              f"`ray get-auth-token` prints it) and submit again") from None
    except (ConnectionError, requests.exceptions.ConnectionError, ray.exceptions.RpcError) as error:
        if following:
            raise ValueError(f"lost the connection to the Ray job server at {address} ({root_reason(error)}); job "
                             f"{following} keeps running there: ray job logs --address {address} --follow {following}"
                             ) from None
        bare = "" if "://" in address else " (without http://, Ray takes it for the head's GCS address)"
        raise ValueError(f"--address {address}: no Ray job server answers there{bare} ({root_reason(error)}). Is "
                         f"the head up? Start one with `ray start --head --dashboard-host 0.0.0.0`; its job server "
                         f"listens on the dashboard port, 8265 by default: --address http://HEAD:8265") from None


def root_reason(error: BaseException) -> str:
    """The innermost cause of a connection failure in words ("Connection refused", "Name or service
    not known"), not the chain of wrappers Ray and requests put around it."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return getattr(error, "strerror", None) or " ".join(str(error).split()) or type(error).__name__


def connect(address: str, headers: dict[str, str] | None):
    """A job client for the cluster at ``address``; Ray's client checks that a job server answers.
    Ray's client would prefer ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` over the address it is
    given, sending the job elsewhere than --address says: they are hidden from it meanwhile (they
    already served as the default for --address)."""
    from ray.job_submission import JobSubmissionClient

    hidden = {name: os.environ.pop(name) for name in ADDRESS_ENV_VARS if name in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(hidden)


def agent_not_ready(error: RuntimeError) -> bool:
    """Whether a refused submission says the head's job agent is not up yet: the head found no agent
    within its own 10 s (Ray's "No available agent"), or found its address but nothing listens there yet."""
    text = str(error)
    return any(sign in text for sign in ("No available agent", "ClientConnectorError", "Cannot connect to host"))


def submit_when_agent_answers(client, address: str, wait_s: float, job: dict) -> str:
    """Submit ``job``, retrying while the head's job agent is still starting (a just-started head
    answers, but takes no job, until its agent is up); one line says so while waiting, and a
    ValueError after ``wait_s`` names what did not answer."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if not agent_not_ready(error):
                raise
            if time.monotonic() >= deadline:
                raise ValueError(f"the job agent at {address} did not answer within {wait_s:.0f} s: the head's job "
                                 f"server is up but takes no job until its agent starts. If the head has just "
                                 f"started, submit again or raise --agent-wait-s; otherwise see dashboard_agent.log "
                                 f"in the head's Ray log folder (/tmp/ray/session_latest/logs)") from None
            if not announced:
                print(f"waiting up to {wait_s:.0f} s for the job agent at {address} (the head's job server answers; "
                      f"its agent is still starting)", flush=True)
                announced = True
            time.sleep(AGENT_RETRY_S)


def wait_for(client, job_id: str, timeout_s: float | None) -> int:
    """Stream the job's logs until it ends; exit code 0 only when it succeeded. Ctrl-C (or the
    timeout) stops the waiting, not the job: it keeps running on the cluster, and the lines printed
    say how to follow or stop it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printed = 0
    status = None
    try:
        while deadline is None or time.monotonic() < deadline:
            status = str(client.get_job_status(job_id)).split(".")[-1]
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
            if status in TERMINAL:
                break
            time.sleep(1.0)
        else:
            print(f"job {job_id} still {status} after {timeout_s:.0f} s; it keeps running on the cluster")
            return 3
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job_id} keeps running on the cluster. Stop it with: "
              f"ray job stop --address {client.get_address()} {job_id}")
        return 130
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run a rae command as a Ray job on a cluster",
        description="Submit a rae command to a Ray cluster as a job, with this project as its working "
                    "directory:  rae submit --address http://HEAD:8265 -- rae encode --shards s3://... "
                    "--store s3://...  Token-auth clusters (Ray >= 2.59): export RAY_AUTH_TOKEN (or "
                    "RAY_AUTH_TOKEN_PATH) first; rae submit sends it.",
    )
    parser.add_argument("--address", help="the cluster's job server, e.g. http://127.0.0.1:8265 "
                                          "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    parser.add_argument("--working-dir", default=str(PROJECT_ROOT), type=absolute_location,
                        help="directory uploaded as the job's working dir (default: this project)")
    parser.add_argument("--no-upload", action="store_true",
                        help="upload nothing: run the rae installed on the cluster's nodes, for clusters whose nodes "
                             "already have this checkout (`rae cluster local`, whose simulated nodes share one disk "
                             "where Ray's per-node unpacking of an uploaded working dir would collide)")
    parser.add_argument("--job-id", help="a submission id of your choosing (default: generated)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None,
                        help="CPUs reserved for the driver (default 0: it may run on the CPU-only head)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None,
                        help="GPUs reserved for the driver (default 0; workers request their own)")
    parser.add_argument("--forward-secrets", action="store_true",
                        help=f"also forward {', '.join(SECRET_ENV_VARS)} from this shell (they become "
                             "visible in the job's runtime env on the cluster)")
    parser.add_argument("--wait", action="store_true", help="stream logs and exit with the job's result; Ctrl-C "
                        "stops the waiting, not the job (it prints how to stop the job)")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many s")
    parser.add_argument("--agent-wait-s", type=float, default=AGENT_WAIT_S,
                        help="how long to wait for the head's job agent to take the job; a just-started head "
                             f"answers before its agent is up (default {AGENT_WAIT_S:.0f})")
    parser.add_argument("rae_command", nargs=argparse.REMAINDER, help="-- then the rae command to run")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.rae_command and args.rae_command[0] == "--":
        args.rae_command = args.rae_command[1:]
    return submit(args)
