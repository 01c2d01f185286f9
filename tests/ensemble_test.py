"""Prediction ensembles (jaxllm/combine/ensemble.py, generation.py, cli/ensemble.py)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import sharding
from jaxllm.cli import ensemble as ensemble_cli
from jaxllm.cli import quantize as quantize_cli
from jaxllm.combine import ensemble
from jaxllm.combine.generation import EnsembleGenerator
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.models import MODELS
from jaxllm.training import train

from helpers import packed_batch, tiny_config, with_model, write_run

# Large init so that random models make confident, different predictions.
BASE = with_model(tiny_config(), init_std=0.3)


def _params(cfg, seed, devices=None):
    s = train.setup(cfg, sharding.make_mesh(C.MeshConfig(data=1, fsdp=-1), devices or jax.devices()[:1]))
    return jax.device_get(train.init_state(s, jax.random.key(seed)).params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two dense members and an MoE member (different architecture, same vocabulary)."""
    root = tmp_path_factory.mktemp("ens")
    moe = with_model(BASE, num_layers=2, moe=C.MoeConfig(num_experts=4, top_k=2))
    out = {}
    for name, cfg, seed in (("a", BASE, 1), ("b", BASE, 2), ("moe", moe, 3)):
        out[name] = write_run(str(root / name), cfg, {1: _params(cfg, seed)})
    return out


def _sums(ens, batch):
    return jax.device_get(ensemble.make_eval_step(ens)(ens.params, sharding.place_batch(batch, ens.mesh)))


@pytest.mark.parametrize("rule", ["mean_prob", "mean_logit"])
def test_ensemble_of_one_equals_the_model(runs, rule):
    ens = ensemble.load([runs["a"]], rule=rule)
    batch = packed_batch()
    got = _sums(ens, batch)["ensemble"]
    cfg = ens.cfgs[0]
    family = MODELS.get(cfg.family)
    want = jax.device_get(jax.jit(family.eval_fn(family.build(cfg), cfg))(
        ens.params[0], sharding.place_batch(batch, ens.mesh)))
    for name in ("loss_sum", "weight_sum", "byte_sum"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)


def test_mean_prob_loss_is_at_most_the_members_mean_loss(runs):
    ens = ensemble.load([runs["a"], runs["b"], runs["moe"]])
    out = _sums(ens, packed_batch(seed=3))
    member_losses = [m["loss_sum"] / m["weight_sum"] for m in out["members"]]
    loss = out["ensemble"]["loss_sum"] / out["ensemble"]["weight_sum"]
    assert len(set(np.round(member_losses, 4))) == 3, "the members differ"
    assert loss <= np.mean(member_losses) + 1e-6  # Jensen: -log of a mean <= mean of -logs
    assert loss < np.mean(member_losses) - 1e-3  # strictly, for members that disagree


def test_rules_match_their_closed_forms():
    rng = np.random.default_rng(0)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 5)) * 3), axis=-1)
    w = jnp.asarray([0.75, 0.25])
    p = np.exp(np.asarray(lp))
    np.testing.assert_allclose(np.exp(ensemble.mean_prob(lp, w)), 0.75 * p[0] + 0.25 * p[1], rtol=1e-5)
    geo = p[0] ** 0.75 * p[1] ** 0.25
    np.testing.assert_allclose(np.exp(ensemble.mean_logit(lp, w)), geo / geo.sum(-1, keepdims=True), rtol=1e-5)
    assert ensemble.normalised_weights([3, 1], 2) == (0.75, 0.25)


def test_vote_majority_and_documented_tie_break():
    def lp(*rows):
        return jnp.log(jnp.asarray(rows, jnp.float32))[:, None, :]  # [M, B=1, C]

    equal = jnp.ones(3) / 3
    # Majority (members 0 and 1 say class 1) beats a confident minority for class 2.
    assert int(ensemble.vote(lp([.4, .6, 0], [.4, .6, 0], [0, .01, .99]), equal)[0]) == 1
    # A 1-1 tie: the tied class with the higher mean probability wins (class 2 here) ...
    two = jnp.ones(2) / 2
    assert int(ensemble.vote(lp([.55, .45, 0], [0, .1, .9]), two)[0]) == 2
    # ... and with equal mean probabilities, the lowest class index.
    assert int(ensemble.vote(lp([.6, 0, .4], [.4, 0, .6]), two)[0]) == 0
    # Weights count: one member with weight 0.6 outvotes two with 0.2 each.
    assert int(ensemble.vote(lp([.9, .1, 0], [.1, .9, 0], [.1, .9, 0]), jnp.asarray([.6, .2, .2]))[0]) == 0


def test_sharded_ensemble_equals_single_device(runs):
    workdirs = [runs["a"], runs["moe"]]
    batch = packed_batch(seed=5)
    one = _sums(ensemble.load(workdirs, weights=[2, 1], devices=jax.devices()[:1]), batch)
    ens8 = ensemble.load(workdirs, weights=[2, 1])
    assert ens8.mesh.size == 8
    eight = _sums(ens8, batch)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=2e-5)


def test_mismatched_members_are_a_clear_error(runs, tmp_path):
    other = write_run(str(tmp_path / "v512"), with_model(BASE, vocab_size=512),
                      {1: _params(with_model(BASE, vocab_size=512), 0)})
    with pytest.raises(C.ConfigError, match="differs from .* in its outputs"):
        ensemble.load([runs["a"], other])
    with pytest.raises(C.ConfigError, match="vote is for classifiers"):
        ensemble.load([runs["a"]], rule="vote")
    with pytest.raises(C.ConfigError, match="one weight per"):
        ensemble.load([runs["a"], runs["b"]], weights=[1.0])


def test_ensemble_generation(runs):
    ens = ensemble.load([runs["a"], runs["b"]])
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    prompts, rng = [[256, 10, 20], [256, 7]], jax.random.key(0)
    cfg_a = ens.cfgs[0].model
    alone = Generator(cfg_a, ens.mesh).generate(ens.params[0], prompts, greedy, rng)
    # One member samples exactly what the member samples alone.
    assert EnsembleGenerator([cfg_a], [1.0], mesh=ens.mesh).generate(ens.params[:1], prompts, greedy, rng) == alone
    # Two different members: the cache path equals recomputing the combined distribution.
    both = EnsembleGenerator([c.model for c in ens.cfgs], ens.weights, mesh=ens.mesh)
    cached = both.generate(ens.params, prompts, greedy, rng)
    assert cached == both.generate(ens.params, prompts, greedy, rng, use_cache=False)
    assert len(cached[0]) == 6


def test_cli_prints_members_and_ensemble(runs, capsys):
    ensemble_cli.main(["--workdir", runs["a"], "--workdir", runs["b"], "--eval_batches", "1"])
    report = json.loads(capsys.readouterr().out)
    assert [m["workdir"] for m in report["members"]] == [os.path.abspath(runs["a"]), os.path.abspath(runs["b"])]
    assert {"eval_loss", "eval_bits_per_byte"} <= set(report["ensemble"])
    with pytest.raises(SystemExit):
        ensemble_cli.main(["--workdir", runs["a"], "--rule", "median"])
    assert "is not registered" in capsys.readouterr().err


def test_classifier_ensemble_reports_accuracy_and_f1(tmp_path):
    cfg = dataclasses.replace(BASE, family="classifier", classifier=C.ClassifierConfig(num_classes=3),
                              data=dataclasses.replace(BASE.data, classes=("x", "y", "z")))
    a = write_run(str(tmp_path / "ca"), cfg, {1: _params(cfg, 1)})
    b = write_run(str(tmp_path / "cb"), cfg, {1: _params(cfg, 2)})
    ens = ensemble.load([a, b], rule="vote")
    batch = {k: v for k, v in packed_batch().items() if k != "targets"}
    batch["labels"] = np.arange(8, dtype=np.int32) % 3
    batch["weights"] = np.ones(8, np.float32)
    out = _sums(ens, batch)
    totals = {k: np.asarray(v, np.float64) for k, v in out["ensemble"].items()}
    metrics = MODELS.get("classifier").eval_metrics(totals)
    assert {"eval_accuracy", "eval_macro_f1"} <= set(metrics)
    assert np.asarray(out["ensemble"]["confusion"]).sum() == 8


def test_an_int8_member_joins_a_float_one(runs, tmp_path):
    int8 = str(tmp_path / "a_int8")
    quantize_cli.quantize_workdir(runs["a"], int8)
    out = _sums(ensemble.load([runs["a"], int8]), packed_batch(seed=7))
    float_loss, int8_loss = (m["loss_sum"] / m["weight_sum"] for m in out["members"])
    assert float_loss != int8_loss and abs(float_loss - int8_loss) < 0.02 * float_loss
