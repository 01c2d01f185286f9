"""Weight averaging (jaxllm/combine/soup.py, cli/soup.py): uniform and greedy soups, the last K
checkpoints, and the errors for ingredients that cannot be averaged."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import restore, sharding
from jaxllm.cli import quantize as quantize_cli
from jaxllm.cli import soup as soup_cli
from jaxllm.combine import soup
from jaxllm.training import train

from helpers import tiny_config, write_run

BASE = tiny_config()


def _params(cfg, seed):
    s = train.setup(cfg, sharding.make_mesh(C.MeshConfig(data=1, fsdp=-1), jax.devices()[:1]))
    return jax.device_get(train.init_state(s, jax.random.key(seed)).params)


def _restored(workdir):
    return jax.device_get(restore.load_params(workdir)[1])


def _assert_trees_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **kw)


@pytest.fixture(scope="module")
def params():
    return [_params(BASE, seed) for seed in (1, 2, 3)]


def test_soup_of_identical_models_is_the_model(tmp_path, params):
    a = write_run(str(tmp_path / "a"), BASE, {4: params[0]})
    record = soup.make_soup([a, a, a], str(tmp_path / "soup"))
    assert record["kind"] == "uniform"
    _assert_trees_close(_restored(str(tmp_path / "soup")), params[0], rtol=1e-6)


def test_uniform_soup_is_the_mean_and_a_run_directory(tmp_path, params):
    a = write_run(str(tmp_path / "a"), BASE, {4: params[0]})
    b = write_run(str(tmp_path / "b"), BASE, {4: params[1]})
    soup_cli.main(["--workdir", a, "--workdir", b, "--out", str(tmp_path / "ab")])
    cfg, got = restore.load_params(str(tmp_path / "ab"))
    _assert_trees_close(jax.device_get(got), jax.tree.map(lambda x, y: (x + y) / 2, params[0], params[1]),
                        rtol=1e-5, atol=1e-7)
    assert cfg.model == restore.load_config(a).model


def test_greedy_soup_keeps_a_planted_best_and_rejects_a_planted_bad_ingredient():
    # Held-out loss = squared distance to a target: ingredient 3 is the best, 2 and 0 each improve
    # the soup they join, 1 is far off and would spoil any soup it joined.
    target = np.array([1.0, 1.0])
    ingredients = [{"w": np.array([0.95, 1.05])}, {"w": np.array([-5.0, -5.0])}, {"w": np.array([1.0, 0.94])},
                   {"w": np.array([1.05, 1.0])}]

    def evaluate(p):
        return {"eval_loss": float(np.sum((np.asarray(p["w"]) - target) ** 2))}

    kept, best_soup, metrics = soup.greedy(ingredients, evaluate)
    assert kept[0] == 3, "the best ingredient comes first"
    assert 1 not in kept, "the bad ingredient is rejected"
    assert kept == [3, 2, 0]
    np.testing.assert_allclose(best_soup["w"], np.mean([ingredients[i]["w"] for i in kept], axis=0), rtol=1e-6)
    assert evaluate(best_soup)["eval_loss"] < min(m["eval_loss"] for m in metrics)


def test_greedy_soup_on_real_runs_rejects_a_broken_ingredient(tmp_path, params):
    good = write_run(str(tmp_path / "good"), BASE, {4: params[0]})
    broken = jax.tree.map(lambda x: x * 50.0, params[1])  # a diverged run
    bad = write_run(str(tmp_path / "bad"), BASE, {4: broken})
    record = soup.make_soup([bad, good], str(tmp_path / "g"), greedy_soup=True, held_out=[0])
    assert record["kept"] == [record["ingredients"][1]]
    _assert_trees_close(_restored(str(tmp_path / "g")), params[0], rtol=1e-6)


def test_last_k_checkpoints_average(tmp_path, params):
    run = write_run(str(tmp_path / "run"), BASE, {10: params[0], 20: params[1], 30: params[2]})
    out = json.loads(json.dumps(soup.average_last(run, str(tmp_path / "last2"), 2)))
    assert out["steps"] == [20, 30]
    _assert_trees_close(_restored(str(tmp_path / "last2")),
                        jax.tree.map(lambda x, y: (x + y) / 2, params[1], params[2]), rtol=1e-5, atol=1e-7)
    with pytest.raises(C.ConfigError, match="keeps 3 checkpoints"):
        soup.average_last(run, str(tmp_path / "last9"), 9)


def test_incompatible_ingredients_are_clear_errors(tmp_path, params, capsys):
    a = write_run(str(tmp_path / "a"), BASE, {4: params[0]})
    wide = dataclasses.replace(BASE, model=dataclasses.replace(BASE.model, mlp_dim=192))
    w = write_run(str(tmp_path / "w"), wide, {4: _params(wide, 0)})
    with pytest.raises(C.ConfigError, match="does not have the params of .*first difference at"):
        soup.make_soup([a, w], str(tmp_path / "x"))
    # LoRA runs of different bases (checked on the configs; the merged params have one shape).
    lora = dataclasses.replace(BASE, finetune=C.FinetuneConfig(mode="lora"))
    one, other = dataclasses.replace(lora, init_from="runs/base1"), dataclasses.replace(lora, init_from="runs/base2")
    with pytest.raises(C.ConfigError, match="needs one base"):
        soup.check_compatible(["x", "y"], [one, other], [params[0], params[0]])
    soup.check_compatible(["x", "y"], [one, one], [params[0], params[1]])  # one base: fine
    full_from_base1 = dataclasses.replace(BASE, init_from="runs/base1")
    soup.check_compatible(["x", "y"], [full_from_base1, one], [params[0], params[1]])  # full + LoRA, one base
    quantize_cli.quantize_workdir(a, str(tmp_path / "a_int8"))
    with pytest.raises(C.ConfigError, match="int8-quantized"):
        soup.make_soup([a, str(tmp_path / "a_int8")], str(tmp_path / "y"))
    with pytest.raises(SystemExit):
        soup_cli.main(["--workdir", a, "--out", a])
    assert "new run directory" in capsys.readouterr().err
