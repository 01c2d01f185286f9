"""Every experiment file loads, builds a valid config and eval_shape-initialises its state; the
command-line contract holds."""

import dataclasses
import glob
import os
import subprocess
import sys

import jax
import pytest

from jaxllm import validation
from jaxllm.cli.plan import load_experiment
from jaxllm.models import transformer as model_lib
from jaxllm import sharding
from jaxllm.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def test_there_are_experiments():
    names = {os.path.basename(p) for p in EXPERIMENTS}
    assert {"tiny_lm.py", "small_lm.py"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_initialises_abstractly(path):
    module = load_experiment(path)
    assert module.__doc__ and "python experiments/" in module.__doc__, "docstring gives the run command"
    cfg = module.get_config()
    validation.validate(cfg)
    # Fit the experiment's mesh onto the 8 test devices: its shape is for real hardware.
    mesh_cfg = cfg.mesh
    if abs(mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor * mesh_cfg.expert) > 8 or -1 not in dataclasses.astuple(mesh_cfg):
        mesh_cfg = dataclasses.replace(mesh_cfg, fsdp=-1)
    s = train.setup(cfg, sharding.make_mesh(mesh_cfg))
    params = s.abstract_state.params
    assert model_lib.count_params(params) > 0
    # eval_shape of the real init path: shapes only, nothing allocated.
    with sharding.activate(s.mesh):
        shapes = jax.eval_shape(train.state_initializer(s), jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(s.abstract_state)
    for got, want in zip(jax.tree.leaves(shapes), jax.tree.leaves(s.abstract_state)):
        assert got.shape == want.shape and got.sharding == want.sharding


def test_small_lm_has_about_100m_parameters():
    cfg = load_experiment(os.path.join(ROOT, "experiments", "small_lm.py")).get_config()
    s = train.setup(cfg, sharding.make_mesh(dataclasses.replace(cfg.mesh, fsdp=-1, tensor=2)))
    n = model_lib.count_params(s.abstract_state.params)
    assert 80e6 < n < 130e6, n


def test_unknown_key_exits_nonzero_with_one_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "tiny_lm.py"), "model.num_layer=2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.num_layers" in lines[0], result.stderr


def test_mesh_that_does_not_fit_exits_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "tiny_lm.py"), f"workdir={tmp_path}",
         "mesh.fsdp=3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "mesh.fsdp=3" in result.stderr and "devices" in result.stderr
