"""Prediction ensembles: N run directories restored onto one mesh and evaluated by one jitted
program that runs every member on the same batch and combines their predictions.

    ens = ensemble.load(["runs/a", "runs/b"], rule="mean_prob", weights=(2, 1))
    report = ensemble.evaluate(ens, range(8))   # {"members": [...], "ensemble": {...}}

Members may differ in architecture (dense, MoE, pruned, int8-quantized, LoRA-merged) but must be
of one family and share the tokenizer and the output space (a language model's vocabulary, a
classifier's class names). Rules (`RULES`), with normalised weights w_m and log-probs lp_m:

    mean_prob    log Σ_m w_m p_m             the mixture of the members' distributions
    mean_logit   log_softmax(Σ_m w_m lp_m)   the normalised weighted geometric mean
    vote         classifiers: the class with the largest weighted count of the members' argmaxes;
                 ties go to the tied class with the highest mean_prob probability, then to the
                 lowest class index. Its loss is mean_prob's (a vote has no probability).

Shape legend: M members, B batch, L length, V vocabulary, C classes, "..." B (and L).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import restore, sharding, validation
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config, ConfigError
from jaxllm.models import MODELS
from jaxllm.registry import Registry
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train

# rule: (log_probs_M... [M, ..., K], weights_M) -> combined log-probs [..., K]
RULES = Registry("--rule")


@RULES.register("mean_prob")
def mean_prob(log_probs_MXK, weights_M):
    w = jnp.log(weights_M).reshape((-1,) + (1,) * (log_probs_MXK.ndim - 1))
    return jax.nn.logsumexp(log_probs_MXK + w, axis=0)


@RULES.register("mean_logit")
def mean_logit(log_probs_MXK, weights_M):
    w = weights_M.reshape((-1,) + (1,) * (log_probs_MXK.ndim - 1))
    return jax.nn.log_softmax(jnp.sum(log_probs_MXK * w, axis=0), axis=-1)


@RULES.register("vote")
def vote_log_probs(log_probs_MXK, weights_M):
    """A vote's probabilities are mean_prob's; the vote changes the predicted class only."""
    return mean_prob(log_probs_MXK, weights_M)


def vote(log_probs_MBC, weights_M):
    """The weighted majority class per row; ties to the highest mean_prob probability among the
    tied classes, then to the lowest class index."""
    C = log_probs_MBC.shape[-1]
    votes_BC = jnp.einsum("m,mbc->bc", weights_M, jax.nn.one_hot(jnp.argmax(log_probs_MBC, -1), C))
    # Weights are floats: counts within 1e-6 of the top are a tie.
    tied_BC = votes_BC >= jnp.max(votes_BC, axis=-1, keepdims=True) - 1e-6
    mean_BC = mean_prob(log_probs_MBC, weights_M)
    return jnp.argmax(jnp.where(tied_BC, mean_BC, -jnp.inf), axis=-1)  # argmax: first of equals


@dataclasses.dataclass
class Ensemble:
    """Members' workdirs, configs (made to evaluate on `mesh`), modules and params on `mesh`."""

    workdirs: tuple[str, ...]
    cfgs: tuple[Config, ...]
    models: tuple[Any, ...]
    params: tuple[Any, ...]
    mesh: jax.sharding.Mesh
    rule: str = "mean_prob"
    weights: tuple[float, ...] = ()  # normalised to sum 1

    @property
    def family(self) -> str:
        return self.cfgs[0].family


def output_space(cfg: Config) -> tuple:
    """What members must share: family, tokenizer, and vocabulary size or class names."""
    if cfg.family == "classifier":
        out = ("classes", cfg.classifier.num_classes, tuple(cfg.data.classes))
    else:
        out = ("vocab_size", cfg.model.vocab_size)
    return (cfg.family, tokenizer_lib.fingerprint(cfg.model.tokenizer), out)


def check_compatible(workdirs: Sequence[str], cfgs: Sequence[Config]) -> None:
    first = output_space(cfgs[0])
    for workdir, cfg in zip(workdirs[1:], cfgs[1:]):
        theirs = output_space(cfg)
        for what, a, b in zip(("family", "tokenizer", "outputs"), first, theirs):
            if a != b:
                raise ConfigError(f"{workdir} differs from {workdirs[0]} in its {what} ({b} vs {a}); "
                                  "ensemble members must share family, tokenizer and vocabulary or classes")


def normalised_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if not weights:
        return (1.0 / n,) * n
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} members; give one weight per --workdir")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ConfigError(f"weights must be positive and finite, got {list(weights)}")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def shared_mesh(cfgs: Sequence[Config], tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """One mesh of the local devices that every member's params fit: fsdp over a device count
    dividing all their d_models (restore.load_params' rule for one model)."""
    d_model = math.gcd(*(c.model.d_model for c in cfgs))
    n = len(devices) if devices is not None else None
    mesh_cfg = sharding.params_mesh_config(dataclasses.replace(cfgs[0].model, d_model=d_model), tensor, n)
    return sharding.make_mesh(mesh_cfg, devices)


def load(workdirs: Sequence[str], rule: str = "mean_prob", weights: Sequence[float] | None = None,
         tensor: int = 1, devices=None) -> Ensemble:
    """Every member's latest params restored onto one shared mesh."""
    if not workdirs:
        raise ConfigError("an ensemble needs at least one --workdir")
    RULES.get(rule)
    cfgs = [restore.load_config(w) for w in workdirs]
    check_compatible(workdirs, cfgs)
    if MODELS.get(cfgs[0].family).images:  # their batches carry images
        raise ConfigError(f"{workdirs[0]} is a {cfgs[0].family} run; ensembles take text-only families "
                          "(causal_lm, classifier)")
    if rule == "vote" and cfgs[0].family != "classifier":
        raise ConfigError(f"--rule vote is for classifiers; {workdirs[0]} is a {cfgs[0].family} run "
                          "(use mean_prob or mean_logit)")
    weights = normalised_weights(weights, len(workdirs))
    mesh = shared_mesh(cfgs, tensor, devices)
    cfgs = [restore.inference_config(c, mesh) for c in cfgs]
    params = []
    for workdir, cfg in zip(workdirs, cfgs):
        validation.validate(cfg)
        restore.check_mesh(cfg, mesh)
        params.append(restore.restore_params(ckpt.checkpoint_dir(workdir), cfg, mesh)[0])
    models = tuple(MODELS.get(c.family).build(c) for c in cfgs)
    return Ensemble(tuple(workdirs), tuple(cfgs), models, tuple(params), mesh, rule, weights)


def member_log_probs(models, params, batch) -> list:
    """Each member's float32 log-probs of one batch ([B, L, V] or [B, C])."""
    out = []
    for model, p in zip(models, params):
        logits = model.apply({"params": p}, batch["inputs"], batch["segment_ids"], batch["positions"])
        out.append(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return out


def lm_sums(log_probs_BLV, batch, token_bytes_V) -> dict:
    """A causal LM's evaluation sums (models/causal_lm.eval_fn's) from log-probs."""
    nll_BL = -jnp.take_along_axis(log_probs_BLV, batch["targets"][..., None], axis=-1)[..., 0]
    return {"loss_sum": jnp.sum(nll_BL * batch["weights"]), "weight_sum": jnp.sum(batch["weights"]),
            "byte_sum": jnp.sum(batch["weights"] * token_bytes_V[batch["targets"]])}


def classifier_sums(log_probs_BC, predicted_B, batch) -> dict:
    """A classifier's evaluation sums (models/classifier.eval_fn's) from log-probs and predictions."""
    C = log_probs_BC.shape[-1]
    nll_B = -jnp.take_along_axis(log_probs_BC, batch["labels"][:, None], axis=-1)[:, 0]
    confusion_CC = jnp.einsum("bt,bp->tp", jax.nn.one_hot(batch["labels"], C) * batch["weights"][:, None],
                              jax.nn.one_hot(predicted_B, C))
    return {"loss_sum": jnp.sum(nll_B * batch["weights"]), "weight_sum": jnp.sum(batch["weights"]),
            "confusion": confusion_CC}


def make_sums_fn(ens: Ensemble):
    """(params tuple, batch) -> {"members": [sums, ...], "ensemble": sums}: all members and the
    combination in one function (jit it once)."""
    rule, weights_M = RULES.get(ens.rule), jnp.asarray(ens.weights, jnp.float32)
    cfg = ens.cfgs[0]
    if ens.family == "classifier":
        def sums(lp, batch, predicted=None):
            return classifier_sums(lp, jnp.argmax(lp, -1) if predicted is None else predicted, batch)
    else:
        table = tokenizer_lib.load(cfg.model.tokenizer).token_bytes()
        token_bytes_V = jnp.zeros(cfg.model.vocab_size, jnp.float32).at[:len(table)].set(table)

        def sums(lp, batch, predicted=None):
            return lm_sums(lp, batch, token_bytes_V)

    def fn(params, batch):
        log_probs_MXK = jnp.stack(member_log_probs(ens.models, params, batch))
        combined = rule(log_probs_MXK, weights_M)
        predicted = vote(log_probs_MXK, weights_M) if ens.rule == "vote" else None
        return {"members": [sums(lp, batch) for lp in log_probs_MXK],
                "ensemble": sums(combined, batch, predicted)}

    return fn


def make_eval_step(ens: Ensemble):
    jitted = jax.jit(make_sums_fn(ens), out_shardings=sharding.replicated(ens.mesh))

    def run(params, batch):
        with sharding.activate(ens.mesh):
            return jitted(params, batch)

    run.jitted = jitted
    return run


def eval_batches(ens: Ensemble):
    """The first member's validation batches (every member is evaluated on the same rows)."""
    cfg = ens.cfgs[0]
    return MODELS.get(cfg.family).batches(cfg, "eval")


def _add(totals: dict, sums: dict) -> None:
    for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)


def _metrics(family: str, totals: dict) -> dict:
    return {name: float(v) if np.ndim(v) == 0 else v for name, v in MODELS.get(family).eval_metrics(totals).items()}


def batch_indices(num_batches: int, first: int = 0, stride: int = 1) -> list[int]:
    """Validation batches first, first + stride, ...: a stride of 2 splits an unshuffled split
    (a classifier's, in file and so class order) into two halves of alike classes."""
    if num_batches < 1 or first < 0 or stride < 1:
        raise ConfigError(f"batches: count {num_batches} and stride {stride} must be >= 1, first {first} >= 0")
    return [first + stride * i for i in range(num_batches)]


def evaluate(ens: Ensemble, indices: Sequence[int], eval_step=None, batches=None) -> dict:
    """Each member's and the ensemble's family metrics over the validation batches `indices`."""
    eval_step = eval_step or make_eval_step(ens)
    batches = batches or eval_batches(ens)
    members: list[dict] = [{} for _ in ens.params]
    combined: dict = {}
    for k in indices:
        out = jax.device_get(eval_step(ens.params, train.place_rows(batches, k, ens.mesh)))
        for totals, sums in zip(members, out["members"]):
            _add(totals, sums)
        _add(combined, out["ensemble"])
    return {
        "rule": ens.rule, "weights": list(ens.weights),
        "members": [{"workdir": w, **_metrics(ens.family, t)} for w, t in zip(ens.workdirs, members)],
        "ensemble": _metrics(ens.family, combined),
    }
