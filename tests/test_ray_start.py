"""Ray's start is tried again only when the local node misses its fixed start window."""
from __future__ import annotations

import pytest
import ray

from pipelines.ray_start import init_ray

TIMED_OUT = Exception("The current node timed out during startup. This could happen because some of the "
                      "raylet failed to startup or the GCS has become overloaded.")


def _fake_init(monkeypatch, outcomes: list[Exception | None]) -> list[dict]:
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        outcome = outcomes[len(calls) - 1]
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


def test_a_start_that_timed_out_is_tried_again_with_the_same_arguments(monkeypatch):
    calls = _fake_init(monkeypatch, [TIMED_OUT, TIMED_OUT, None])
    said: list[str] = []
    init_ray(address="local", num_cpus=2, on_retry=said.append)
    assert calls == [{"address": "local", "num_cpus": 2}] * 3
    assert said == ["Ray's start timed out (a loaded machine?); trying again (2/3)",
                    "Ray's start timed out (a loaded machine?); trying again (3/3)"]


def test_the_last_timeout_is_raised(monkeypatch):
    calls = _fake_init(monkeypatch, [TIMED_OUT] * 3)
    with pytest.raises(Exception, match="timed out during startup"):
        init_ray(address="local", on_retry=lambda message: None)
    assert len(calls) == 3


def test_any_other_failure_is_raised_at_once(monkeypatch):
    calls = _fake_init(monkeypatch, [ConnectionError("Could not find any running Ray instance"), None])
    with pytest.raises(ConnectionError, match="running Ray instance"):
        init_ray(address="auto")
    assert len(calls) == 1
