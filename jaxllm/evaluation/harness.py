"""jaxllm runs as an lm-evaluation-harness model (`lm_eval`, the optional `eval` extra): the
"jaxllm" model class, restored through the one restore path (float, int8, pruned, LoRA, MoE,
distilled, imported runs; a list of runs is an ensemble, jaxllm/combine/ensemble.py), on the
run's mesh.

    lm = JaxllmLM("runs/tiny_lm", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["jaxllm_stdlib_qa"], task_manager=runner.task_manager(...))
    # or, once jaxllm.evaluation is imported (it registers the class):
    lm_eval.simple_evaluate(model="jaxllm", model_args="workdir=runs/tiny_lm", tasks=[...], ...)

Scoring (loglikelihood, loglikelihood_rolling): requests sorted by length, `batch_size` rows a
call padded on the right to the next of a few bucket lengths (powers of two up to max_length),
so jit compiles one program per bucket; padding is masked (segment id 0), so it changes no
score. A context starts with BOS, as every training document does. generate_until: jaxllm's
cached decoding (decoding.Generator, greedy unless the task asks to sample), cut at the first
stop string; the Generator has no stop-string hook, so a batch decodes max_gen_toks tokens (fewer
only when every row reaches EOS).

Shape legend: B batch, L length, V vocabulary, M ensemble members.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from jaxllm import restore, sharding
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.combine import ensemble as ensemble_lib
from jaxllm.combine.generation import EnsembleGenerator
from jaxllm.config import ConfigError
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.models import MODELS

MIN_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256


def bucket_length(n: int, max_length: int) -> int:
    """The padded length of a row of n tokens: the next power of two (at least MIN_BUCKET), capped
    at max_length (a few shapes, so a few compilations)."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return max(min(b, max_length), n)


def score_rows(rows: Sequence[tuple[list[int], int]], pad_id: int, length: int, batch: int) -> dict:
    """A right-padded batch [batch, length] from rows (tokens, n_scored): inputs tokens[:-1],
    targets tokens[1:], weight 1 on the last n_scored targets (the continuation)."""
    inputs = np.full((batch, length), pad_id, np.int32)
    targets = np.full((batch, length), pad_id, np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    weights = np.zeros((batch, length), np.float32)
    for i, (tokens, n_scored) in enumerate(rows):
        n = len(tokens) - 1
        inputs[i, :n], targets[i, :n] = tokens[:-1], tokens[1:]
        segment_ids[i, :n], positions[i, :n] = 1, np.arange(n)
        weights[i, n - n_scored:n] = 1.0
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "weights": weights}


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            cut = min(cut, at) if at >= 0 else cut
    return text[:cut]


@dataclasses.dataclass
class Runs:
    """What the harness model evaluates: one run, or an ensemble's members with their combining
    rule, all on one mesh."""

    workdirs: tuple[str, ...]
    cfgs: tuple
    models: tuple
    params: tuple
    mesh: jax.sharding.Mesh
    rule: str = "mean_prob"
    weights: tuple[float, ...] = (1.0,)


def load_runs(workdirs: Sequence[str], tensor: int = 1, rule: str = "mean_prob",
              weights: Sequence[float] | None = None, ensemble: bool = False) -> Runs:
    """One workdir through restore.load_params (its own mesh); several, or `ensemble`, through
    ensemble.load (a mesh they share)."""
    if not workdirs:
        raise ConfigError("give at least one --workdir")
    if len(workdirs) == 1 and not ensemble:
        cfg, params = restore.load_params(workdirs[0], tensor=tensor)
        runs = Runs(tuple(workdirs), (cfg,), (MODELS.get(cfg.family).build(cfg),), (params,),
                    jax.tree.leaves(params)[0].sharding.mesh)
    else:
        ens = ensemble_lib.load(workdirs, rule, weights, tensor=tensor)
        runs = Runs(ens.workdirs, ens.cfgs, ens.models, ens.params, ens.mesh, ens.rule, ens.weights)
    cfg = runs.cfgs[0]
    family = MODELS.get(cfg.family)
    if not family.generates or family.images:
        raise ConfigError(f"{workdirs[0]} is a {cfg.family} run; lm-eval scores text with a language model "
                          "(a causal_lm run: dense, MoE, int8, pruned, LoRA, distilled or imported)")
    return runs


def make_score_fn(runs: Runs):
    """(params tuple, batch) -> (sum of the weighted targets' log-probs [B], whether every weighted
    target is the argmax [B]), under the ensemble rule when there are several members."""
    rule, weights_M = ensemble_lib.RULES.get(runs.rule), jnp.asarray(runs.weights, jnp.float32)

    def fn(params, batch):
        log_probs_BLV = rule(jnp.stack(ensemble_lib.member_log_probs(runs.models, params, batch)), weights_M)
        target_BL = jnp.take_along_axis(log_probs_BLV, batch["targets"][..., None], axis=-1)[..., 0]
        scored_BL = batch["weights"] > 0
        greedy_BL = jnp.argmax(log_probs_BLV, axis=-1) == batch["targets"]
        return (jnp.sum(jnp.where(scored_BL, target_BL, 0.0), axis=-1),
                jnp.all(greedy_BL | ~scored_BL, axis=-1))

    return jax.jit(fn, out_shardings=sharding.replicated(runs.mesh))


@register_model("jaxllm")
class JaxllmLM(TemplateLM):
    """A jaxllm run (or ensemble of runs) as an lm-eval model. `workdir`: one run directory, or
    several joined by "|" (an ensemble, combined by `rule`)."""

    def __init__(self, workdir: str | Sequence[str], batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, tensor: int = 1, rule: str = "mean_prob",
                 ensemble: bool = False, seed: int = 0, runs: Runs | None = None, **kwargs):
        super().__init__()
        workdirs = workdir.split("|") if isinstance(workdir, str) else list(workdir)
        self.runs = runs if runs is not None else load_runs(workdirs, int(tensor), rule, ensemble=ensemble)
        cfg = self.runs.cfgs[0]
        self.tok = tokenizer_lib.load(cfg.model.tokenizer)
        self.pad_id = self.tok.pad_or_eos
        self.batch_size_per_call = int(batch_size) if str(batch_size) != "auto" else 16
        self._max_length = int(max_length) if max_length else min(c.train.seq_len for c in self.runs.cfgs)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._score = make_score_fn(self.runs)
        models = [c.model for c in self.runs.cfgs]
        self._generator = (Generator(models[0], self.runs.mesh) if len(models) == 1
                           else EnsembleGenerator(models, self.runs.weights, self.runs.rule, self.runs.mesh))
        self._shards = sharding.axis_size(self.runs.mesh, sharding.BATCH_AXES)

    # -- what TemplateLM asks for --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.pad_id

    @property
    def prefix_token_id(self) -> int:
        # Every training document starts with BOS: a context is conditioned on it.
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.runs.cfgs[0].model.tokenizer

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string).tolist()
        return [self.prefix_token_id] + ids if add_special_tokens else ids

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # -- scoring -------------------------------------------------------------------------------

    def _rows_per_call(self) -> int:
        # batch_size rounded up to a multiple of the mesh's batch shards (rows are split over them).
        return -(-self.batch_size_per_call // self._shards) * self._shards

    def score_tokens(self, rows: Sequence[tuple[list[int], int]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(log-prob, is_greedy) of the last n_scored tokens of each (tokens, n_scored) row, given
        the tokens before them; rows longer than max_length + 1 keep their last max_length + 1."""
        rows = [(list(t)[-(self.max_length + 1):], n) for t, n in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list = [None] * len(rows)
        B = self._rows_per_call()
        for lo in tqdm(range(0, len(order), B), disable=disable_tqdm, desc="jaxllm scoring"):
            chunk = order[lo:lo + B]
            length = bucket_length(len(rows[chunk[0]][0]) - 1, self.max_length)
            batch = sharding.place_batch(score_rows([rows[i] for i in chunk], self.pad_id, length, B), self.runs.mesh)
            with sharding.activate(self.runs.mesh):
                logp_B, greedy_B = self._score(self.runs.params, batch)
            logp_B, greedy_B = np.asarray(logp_B), np.asarray(greedy_B)
            for j, i in enumerate(chunk):
                out[i] = (float(logp_B[j]), bool(greedy_B[j]))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = []
        for _, context_enc, continuation_enc in requests:
            if context_enc[:1] != [self.prefix_token_id]:
                context_enc = [self.prefix_token_id] + list(context_enc)
            rows.append((list(context_enc) + list(continuation_enc), len(continuation_enc)))
        results = self.score_tokens(rows, disable_tqdm)
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-prob: max_length windows (lm-eval's rolling windows, the first
        conditioned on BOS), every token scored once."""
        rows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, windows):
                rows.append((list(context) + list(continuation), len(continuation)))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, self.score_tokens(rows, disable_tqdm)):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    def _sampling(self, gen_kwargs: dict) -> tuple[tuple[str, ...], SamplingConfig]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        return until, SamplingConfig(max_new_tokens=max_new, temperature=temperature,
                                     top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Cached decoding (decoding.Generator) of each context, cut at its first stop string.
        Requests with the same generation settings share batches of batch_size - 1 prompts (at
        least one) plus one filler prompt of the batch's bucket length: every batch of a bucket
        then has one shape and one compiled prefill and decode step."""
        groups: dict = {}
        for k, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(self._sampling(gen_kwargs), []).append((k, context))
        out: list = [None] * len(requests)
        per_call = max(self.batch_size_per_call - 1, 1)
        rng = jax.random.key(self.seed)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="jaxllm generating")
        for (until, sampling), items in groups.items():
            room = max(self.max_length - sampling.max_new_tokens, 1)
            prompts = {k: tokenizer_lib.prompt_ids(self.tok, context)[-room:] for k, context in items}
            order = sorted(prompts, key=lambda k: -len(prompts[k]))
            for lo in range(0, len(order), per_call):
                chunk = order[lo:lo + per_call]
                length = bucket_length(len(prompts[chunk[0]]), room)
                fillers = [[self.prefix_token_id] * length] + [[self.prefix_token_id]] * (per_call - len(chunk))
                rng, call_rng = jax.random.split(rng)
                generated = self._generator.generate(
                    self.runs.params if len(self.runs.params) > 1 else self.runs.params[0],
                    [prompts[k] for k in chunk] + fillers, sampling, call_rng)
                for k, tokens in zip(chunk, generated):
                    text = cut_at_stop(self.tok.decode(tokens), until)
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
                progress.update(len(chunk))
        progress.close()
        return out
