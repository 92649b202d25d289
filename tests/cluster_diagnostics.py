"""What a failed test on the local autoscaling cluster adds to its report: the autoscaler's last
status and its launch/terminate decisions, and the actors that are not dead (where they wait, how
often they restarted). CI keeps only the test output, so this is all a failure there leaves behind."""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path

DECISIONS = re.compile(r"Launching|Terminating|Failed|failed|Exception|Error|Traceback|Removing|Adding|heartbeat")
MOST_DECISION_LINES = 40


def describe(cluster) -> str:
    """A compact account of the cluster's state; never raises (a failing test's report must not)."""
    parts = []
    for name, write in (("autoscaler", _autoscaler), ("actors", _actors)):
        try:
            parts.append(write(cluster))
        except Exception as error:  # noqa: BLE001 (diagnostics only)
            parts.append(f"[{name}: could not read: {type(error).__name__}: {error}]")
    return "\n".join(parts)


def _autoscaler(cluster) -> str:
    logs = sorted(glob.glob(str(Path(cluster.workdir) / "ray" / "session_*" / "logs" / "monitor.log")))
    if not logs:
        return "[autoscaler: no monitor.log]"
    text = Path(logs[-1]).read_text(errors="replace").splitlines()
    status_at = max((i for i, line in enumerate(text) if "Autoscaler status:" in line), default=None)
    status = text[status_at:status_at + 30] if status_at is not None else []
    decisions = [line[:240] for line in text if DECISIONS.search(line) and not line.startswith(" ")]
    errors = Path(logs[-1]).with_name("monitor.err")
    err_tail = errors.read_text(errors="replace").splitlines()[-20:] if errors.exists() else []
    return "\n".join(["--- autoscaler: last status ---", *status,
                      f"--- autoscaler: decisions (last {MOST_DECISION_LINES}) ---", *decisions[-MOST_DECISION_LINES:],
                      "--- autoscaler: monitor.err tail ---", *err_tail])


def _actors(cluster) -> str:
    from jobs.local_cluster import exec_inside

    listed = exec_inside(cluster, ["ray", "list", "actors", "--format", "json", "--detail", "--limit", "500"],
                         capture_output=True, text=True, timeout=120)
    out = listed.stdout
    actors = json.loads(out[out.index("["):]) if "[" in out else []
    lines = [f"{a['class_name']} {a['state']} node …{(a.get('node_id') or '-')[-5:]} job {a['job_id']} "
             f"restarts {a.get('num_restarts')} {a.get('name') or ''}".rstrip()
             for a in actors if a.get("state") != "DEAD"]
    return "\n".join(["--- actors not dead ---", *lines] if lines else ["--- actors: none alive ---", listed.stderr[-500:]])
