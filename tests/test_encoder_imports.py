"""What the encode job's processes import: the encode job's fixed cost is mostly a fresh actor
process importing torch and timm (benchmarks/README.md), so the driver's modules import no timm and
the actor's import of timm leaves out wandb. Each case runs in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rae.encoders import ENCODER_PRESETS

ROOT = Path(__file__).resolve().parents[1]


def modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it leaves its findings in ``out`` (printed as JSON)."""
    script = f"import json, sys\nout = {{}}\n{code}\nprint(json.dumps(out))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_driver_modules_import_no_timm():
    out = modules_after(
        "import pipelines.encode, pipelines.encoder_actor, rae.encoders\n"
        "out['timm'] = 'timm' in sys.modules\n"
        "out['presets'] = sorted(rae.encoders.ENCODER_PRESETS)")
    assert out["presets"] == sorted(ENCODER_PRESETS)
    assert out["timm"] is False


def test_encoder_build_imports_timm_without_wandb_and_wandb_still_imports_after():
    pytest.importorskip("wandb")
    out = modules_after(
        "from pipelines.encoder_actor import LatentEncoder\n"
        "from rae.encoders import load_encoder\n"
        "digest = load_encoder('dinov2-s-offline', input_size=56).weights_digest\n"
        "LatentEncoder('dinov2-s-offline', None, 56, False, 'float16', 4, digest)\n"
        "out['timm'] = 'timm' in sys.modules\n"
        "out['wandb'] = 'wandb' in sys.modules\n"
        "import wandb\n"
        "out['wandb_after'] = hasattr(wandb, 'init')")
    assert out == {"timm": True, "wandb": False, "wandb_after": True}


def test_an_imported_wandb_is_left_as_it_is():
    pytest.importorskip("wandb")
    out = modules_after(
        "import wandb\n"
        "from rae.encoders import load_encoder\n"
        "load_encoder('dinov2-s-offline', random_init=True, input_size=56)\n"
        "import timm.utils.summary\n"
        "out['timm_sees_wandb'] = getattr(timm.utils.summary, 'wandb', None) is wandb\n"
        "out['same'] = sys.modules['wandb'] is wandb")
    assert out == {"timm_sees_wandb": True, "same": True}


def test_preset_normalisations_are_the_timm_weights_own():
    import timm

    for spec in ENCODER_PRESETS.values():
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        assert (spec.mean, spec.std) == (tuple(cfg.mean), tuple(cfg.std)), spec.name
