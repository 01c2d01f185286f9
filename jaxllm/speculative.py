"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`gamma` tokens one at a time with its own KV cache, the target scores all of them in one cached
forward pass of gamma + 1 positions, and rejection sampling keeps a prefix of the proposals plus
one token of the target's, so that the output is distributed exactly as the target's own samples
(greedy at temperature 0: token for token the target's greedy output).

    accept draft token d_i with probability min(1, p_i(d_i) / q_i(d_i));
    at the first rejection sample from norm(max(0, p_i - q_i)); if all are accepted, a bonus token from p_gamma

Each round is one jitted program (the draft's gamma + 1 steps in a loop, the target's verification,
the acceptance), after which both caches are rolled back to the accepted length by resetting their
write index: the rejected slots are overwritten before any query can see them, since a query only
sees keys at earlier slots. Rows of a batch share the cache's write index, so a round keeps the
shortest accepted prefix over the rows; a prefix of a valid speculative sample is still a valid
sample, so this only costs speed. `python -m jaxllm.generate --draft DIR --gamma K` is the command.

Shape legend as in decoding.py; G the number of drafted tokens (gamma), G1 = G + 1.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.decoding import Generator, SamplingConfig, filter_logits, pad_prompts


def probabilities(logits_NV, sampling: SamplingConfig):
    """The distribution a token is drawn from: the filtered softmax, or at temperature 0 the
    one-hot of the argmax (so that greedy decoding is the same rejection test, exactly)."""
    if sampling.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits_NV, axis=-1), logits_NV.shape[-1], dtype=jnp.float32)
    filtered = filter_logits(logits_NV.reshape(-1, logits_NV.shape[-1]), sampling.temperature,
                             sampling.top_k, sampling.top_p)
    return jax.nn.softmax(filtered, axis=-1).reshape(logits_NV.shape)


def sample(probs_NV, rng):
    return jax.random.categorical(rng, jnp.log(probs_NV), axis=-1).astype(jnp.int32)


def accept_drafts(p_G1V, q_GV, drafted_G, rng):
    """Rejection sampling of one row: (n, token) with n the number of drafted tokens accepted
    (0..G) and token the target's next one after them: drawn from norm(max(0, p_n - q_n)) after a
    rejection, from p_G when all are accepted. drafted_G were drawn from q_GV."""
    G, V = q_GV.shape
    u_rng, r_rng = jax.random.split(rng)
    p_d = jnp.take_along_axis(p_G1V[:G], drafted_G[:, None], axis=1)[:, 0]
    q_d = jnp.take_along_axis(q_GV, drafted_G[:, None], axis=1)[:, 0]
    # u < p/q without dividing; q(d) > 0 since d was drawn from q.
    accepted_G = jax.random.uniform(u_rng, (G,)) * q_d < p_d
    n = jnp.argmin(jnp.append(accepted_G, False))  # the first rejection, or G
    q_next = jnp.concatenate([q_GV, jnp.zeros((1, V), q_GV.dtype)])[n]  # q_G := 0: the bonus is p_G
    residual_V = jnp.maximum(p_G1V[n] - q_next, 0.0)
    total = jnp.sum(residual_V)
    # p_n == q_n leaves nothing (then no rejection can happen there); p_n is the fallback.
    residual_V = jnp.where(total > 0, residual_V / jnp.where(total > 0, total, 1.0), p_G1V[n])
    return n.astype(jnp.int32), sample(residual_V, r_rng)


def set_cache_index(cache, index):
    """The cache with every layer's write index set to `index` (the rollback)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, index) if getattr(path[-1], "key", None) == "index" else x, cache)


def check_draft(target: ModelConfig, draft: ModelConfig, name: str = "the draft") -> None:
    if (target.tokenizer, target.vocab_size) != (draft.tokenizer, draft.vocab_size):
        raise ConfigError(f"{name} has tokenizer {draft.tokenizer!r} with {draft.vocab_size} tokens, the target "
                          f"{target.tokenizer!r} with {target.vocab_size}: speculative decoding needs the same vocabulary")


class SpeculativeGenerator:
    """Generates with `target` params, `draft` params proposing `gamma` tokens per round."""

    def __init__(self, target_cfg: ModelConfig, draft_cfg: ModelConfig, gamma: int,
                 mesh: jax.sharding.Mesh | None = None):
        check_draft(target_cfg, draft_cfg)
        if gamma < 1:
            raise ConfigError(f"gamma={gamma}: the draft must propose at least one token per round")
        self.target = Generator(target_cfg, mesh)
        # One Generator for both when the configs agree (a self-draft, an int8 target's float
        # original): its jitted prefill is compiled once.
        self.draft = self.target if draft_cfg == target_cfg else Generator(draft_cfg, mesh)
        self.gamma = gamma
        # Of the last `generate` call: rounds, drafted and accepted tokens (rows still running).
        self.last_stats: dict = {}

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4, 5))
    def round(self, sampling: SamplingConfig, target_params, draft_params, t_cache, d_cache, last_B, positions_B,
              slot, done_B, rng):
        """One draft-verify-accept round. `last_B` (at `positions_B`, cache slot `slot`) is the
        newest token, in neither cache yet. Returns the tokens emitted [B, G1] (n + 1 of them are
        valid), n, each row's own accepted count, both caches and the advanced rng."""
        G, B = self.gamma, last_B.shape[0]
        rng, draft_rng, accept_rng = jax.random.split(rng, 3)

        def draft_step(carry, i):
            cache, token_B, key = carry
            key, step_key = jax.random.split(key)
            logits_BV, cache = self.draft.decode_step(draft_params, cache, token_B, positions_B + i)
            q_BV = probabilities(logits_BV, sampling)
            next_B = sample(q_BV, step_key)
            return (cache, next_B, key), (q_BV, next_B)

        # G + 1 steps: the last feeds d_G into the draft's cache (needed when every proposal is
        # accepted); its proposal is dropped.
        (d_cache, _, _), (q_G1BV, drafted_G1B) = jax.lax.scan(
            draft_step, (d_cache, last_B, draft_rng), jnp.arange(G + 1, dtype=jnp.int32))
        q_BGV, drafted_BG = jnp.swapaxes(q_G1BV[:G], 0, 1), jnp.swapaxes(drafted_G1B[:G], 0, 1)

        tokens_BG1 = jnp.concatenate([last_B[:, None], drafted_BG], axis=1)
        positions_BG1 = positions_B[:, None] + jnp.arange(G + 1, dtype=jnp.int32)
        logits_BG1V, t_cache = self.target.forward(target_params, t_cache, tokens_BG1, jnp.ones_like(tokens_BG1),
                                                   positions_BG1)
        p_BG1V = probabilities(logits_BG1V, sampling)
        n_B, correction_B = jax.vmap(accept_drafts)(p_BG1V, q_BGV, drafted_BG, jax.random.split(accept_rng, B))
        n = jnp.min(jnp.where(done_B, G, n_B))
        # Rows that accepted more than the shortest keep their accepted draft token at n.
        j = jnp.arange(G + 1)
        drafted_BG1 = jnp.concatenate([drafted_BG, correction_B[:, None]], axis=1)
        at_n_B = jnp.where(n_B > n, drafted_BG1[:, n], correction_B)
        emitted_BG1 = jnp.where(j < n, drafted_BG1, jnp.where(j == n, at_n_B[:, None], self.target.pad_id))
        emitted_BG1 = jnp.where(done_B[:, None], self.target.pad_id, emitted_BG1)
        keep = slot + n + 1
        return emitted_BG1, n, n_B, set_cache_index(t_cache, keep), set_cache_index(d_cache, keep), rng

    def generate(self, target_params, draft_params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, rng):
        """Generated token ids per prompt (without the prompt, cut after EOS), as
        `Generator.generate` returns them; `last_stats` holds the acceptance figures."""
        target, draft, G = self.target, self.draft, self.gamma
        n_prompts = len(prompts)
        prompts = list(prompts) + [target.filler] * (-n_prompts % target._batch_multiple())
        tokens, segment_ids, positions, lengths = pad_prompts(prompts, "left", target.pad_id)
        B, P = tokens.shape
        T = P + sampling.max_new_tokens + G + 1
        last_slot = np.full(B, P - 1, np.int32)
        start = time.perf_counter()
        target_params = target._run(target.decode_params, target_params)
        draft_params = target._run(draft.decode_params, draft_params)
        placed = [target._place(x) for x in (tokens, segment_ids, positions, last_slot)]
        logits_BV, t_cache = target._run(target.prefill, target_params, target.init_cache(B, T), *placed)
        _, d_cache = target._run(draft.prefill, draft_params, draft.init_cache(B, T), *placed)
        done = np.zeros(B, bool)
        done[n_prompts:] = True
        last_B, done_B, rng = target._run(target.choose, sampling, logits_BV, target._place(done), rng)
        out = [[int(t)] for t in np.asarray(last_B)]
        positions_B, slot = target._place(lengths), P
        stats = {"rounds": 0, "drafted": 0, "accepted": 0, "emitted": 0}

        def finished(row):
            return (sampling.stop_at_eos and target.eos_id in row) or len(row) >= sampling.max_new_tokens

        done |= np.array([finished(r) for r in out])
        while not done.all():
            emitted, n, n_B, t_cache, d_cache, rng = target._run(
                self.round, sampling, target_params, draft_params, t_cache, d_cache, last_B, positions_B, slot,
                target._place(done), rng)
            emitted, n, n_B = np.asarray(emitted), int(n), np.asarray(n_B)
            running = ~done
            stats["rounds"] += 1
            stats["drafted"] += G * int(running.sum())
            stats["accepted"] += int(n_B[running].sum())
            for b in np.flatnonzero(running):
                out[b].extend(int(t) for t in emitted[b, :n + 1])
                stats["emitted"] += n + 1
                done[b] = finished(out[b])
            last_B = target._place(emitted[:, n])
            positions_B, slot = positions_B + n + 1, slot + n + 1
        stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
        stats["tokens_per_round"] = stats["emitted"] / max(stats["rounds"] * n_prompts, 1)
        stats["seconds"] = time.perf_counter() - start
        self.last_stats = stats
        results = []
        for row in out[:n_prompts]:
            row = row[:sampling.max_new_tokens]
            if sampling.stop_at_eos and target.eos_id in row:
                row = row[:row.index(target.eos_id) + 1]
            # Generated padding is dropped, as Generator.generate drops it.
            results.append([t for t in row if t != target.pad_id])
        return results
