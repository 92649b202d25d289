"""Shared test setup: offline hub, deterministic and thread-limited torch, and the fixtures several
test modules use (a local Ray cluster, an S3 server). Test data builders are in builders.py."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from s3_server import s3_server  # noqa: E402

from pipelines.ray_start import init_ray  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: on a shared 2-core machine a second intra-op thread only adds
    contention (measured up to 30x slower under load). Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server for the module; request it before ``ray_cluster`` (see ``ray_env``)."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ray_env() -> dict[str, str]:
    """Environment variables the module's Ray workers must inherit, set before ``ray.init`` and
    restored after the cluster stops. A module overrides this fixture to add variables, or to
    request fixtures that must start first (the ``s3`` server exports its endpoint to the workers)."""
    return {}


@pytest.fixture(scope="module")
def ray_cluster(ray_env):
    """A local 2-CPU Ray cluster of its own for the module (never another process's cluster)."""
    saved = {key: os.environ.get(key) for key in ray_env}
    os.environ.update(ray_env)
    try:
        init_ray(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def class_store(tmp_path_factory) -> str:
    """A class-latent store (tests/builders.py) shared by a module's DiT runs."""
    from builders import class_latent_store

    return class_latent_store(str(tmp_path_factory.mktemp("store") / "latents"))


@pytest.fixture(scope="module")
def local_cluster_spec(tmp_path_factory):
    """What ``local_cluster`` starts: a module overrides this fixture for other node counts or an
    other idle timeout (jobs.local_cluster.LocalClusterSpec)."""
    from jobs.local_cluster import LocalClusterSpec

    return LocalClusterSpec(workdir=tmp_path_factory.mktemp("local-cluster"))


@pytest.fixture(scope="module")
def local_cluster(local_cluster_spec):
    """An autoscaling Ray cluster for the module (fake provider, cpu/gpu nodes from 0, private
    namespaces; jobs/local_cluster.py), stopped after it. Skipped where namespaces are not permitted.
    Do not combine with ``ray_cluster`` in one module: two clusters on two cores starve each other."""
    from jobs.local_cluster import running

    require_namespaces()
    with running(local_cluster_spec) as cluster:
        yield cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the local autoscaling cluster reports the cluster's state with its failure
    (tests/cluster_diagnostics.py): CI keeps nothing else of the cluster."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        from jobs.local_cluster import LocalCluster

        clusters = [value for value in getattr(item, "funcargs", {}).values() if isinstance(value, LocalCluster)]
        if clusters:
            import cluster_diagnostics

            report.sections.append(("local cluster at the failure", cluster_diagnostics.describe(clusters[0])))


def require_namespaces() -> None:
    """Skip where this machine cannot make the local cluster's namespaces (not root, no user
    namespaces, not Linux), unless RAE_REQUIRE_LOCAL_CLUSTER=1 (set by .ci/run): then fail, so CI
    never passes with the cluster tests silently skipped."""
    from jobs.local_cluster import preflight

    try:
        preflight()
    except (PermissionError, FileNotFoundError) as error:
        if os.environ.get("RAE_REQUIRE_LOCAL_CLUSTER") == "1":
            pytest.fail(f"RAE_REQUIRE_LOCAL_CLUSTER=1 but {error}")
        pytest.skip(str(error))
