"""Sampling from an ensemble of language models: every member keeps its own KV cache, and each
new token is drawn from the members' combined next-token distribution (ensemble.RULES:
mean_prob or mean_logit). The loop, padding, sampling filters and stopping are
decoding.Generator's; only the model calls are replaced, so one prefill and one program per token
serve all members.

    gen = EnsembleGenerator([cfg.model for cfg in ens.cfgs], ens.weights, "mean_prob", ens.mesh)
    tokens = gen.generate(ens.params, prompts, SamplingConfig(max_new_tokens=64), jax.random.key(0))

Temperature, top-k and top-p apply to the combined log-probs.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.combine.ensemble import RULES
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.decoding import Generator, SamplingConfig


class EnsembleGenerator(Generator):
    """A Generator whose params and cache are tuples, one entry per member."""

    def __init__(self, model_cfgs: Sequence[ModelConfig], weights: Sequence[float], rule: str = "mean_prob",
                 mesh: jax.sharding.Mesh | None = None):
        if rule not in ("mean_prob", "mean_logit"):
            raise ConfigError(f"--rule {rule} does not generate text; use mean_prob or mean_logit")
        fingerprints = {tokenizer_lib.fingerprint(c.tokenizer) for c in model_cfgs}
        if len(fingerprints) > 1 or len({c.vocab_size for c in model_cfgs}) > 1:
            raise ConfigError("ensemble members must share tokenizer and vocabulary to generate together")
        super().__init__(model_cfgs[0], mesh)
        self.members = tuple(Generator(c, mesh) for c in model_cfgs)
        self.rule = rule
        self.weights = tuple(float(w) for w in weights)

    def _combine(self, logits_per_member):
        log_probs_MBV = jnp.stack([jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in logits_per_member])
        return RULES.get(self.rule)(log_probs_MBV, jnp.asarray(self.weights, jnp.float32))

    def init_cache(self, batch: int, length: int):
        return tuple(g.init_cache(batch, length) for g in self.members)

    @functools.partial(jax.jit, static_argnums=0)
    def decode_params(self, params):
        return tuple(g.decode_params(p) for g, p in zip(self.members, params))

    # `*prefix`: whatever further inputs Generator.generate passes its model calls (an image
    # prefix), handed on to every member unchanged.
    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def prefill(self, params, cache, tokens_BP, segment_ids_BP, positions_BP, last_B, *prefix):
        outs = [g.prefill(p, c, tokens_BP, segment_ids_BP, positions_BP, last_B, *prefix)
                for g, p, c in zip(self.members, params, cache)]
        return self._combine([o[0] for o in outs]), tuple(o[1] for o in outs)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def decode_step(self, params, cache, tokens_B, positions_B):
        outs = [g.decode_step(p, c, tokens_B, positions_B) for g, p, c in zip(self.members, params, cache)]
        return self._combine([o[0] for o in outs]), tuple(o[1] for o in outs)

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
    def decode_and_choose(self, sampling: SamplingConfig, params, cache, tokens_B, positions_B, done_B, rng):
        logits_BV, cache = self.decode_step(params, cache, tokens_B, positions_B)
        tokens_B, done_B, rng = self.choose(sampling, logits_BV, done_B, rng)
        return tokens_B, positions_B + 1, done_B, rng, cache

    @functools.partial(jax.jit, static_argnums=0)
    def recompute_step(self, params, tokens_BT, segment_ids_BT, positions_BT, last_B, *prefix):
        return self._combine([g.recompute_step(p, tokens_BT, segment_ids_BT, positions_BT, last_B, *prefix)
                              for g, p in zip(self.members, params)])
