"""The autoscaler configs are valid for the Ray that ships with the project, and keep their promises."""
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "cluster.yaml", ROOT / "jobs" / "cluster-gcp.yaml"]


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_rays_own_schema(path, ray_schema):
    jsonschema.validate(yaml.safe_load(path.read_text()), ray_schema)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_head_runs_no_work_and_gpu_workers_scale_from_zero(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_types = [name for name, t in types.items()
                 if name != config["head_node_type"] and "GPU" not in t["resources"]]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu_types)
    assert cpu_types, "a CPU worker type for decode-heavy work"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_installs_this_package_and_holds_no_secrets(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert any("pip install" in c and "~/rae" in c for c in config["setup_commands"])
    for secret in ("AWS_SECRET_ACCESS_KEY:", "WANDB_API_KEY:", "aws_secret_access_key", "private_key"):
        assert secret not in text
