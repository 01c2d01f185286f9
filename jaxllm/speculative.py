"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`gamma` tokens one at a time with its own KV cache, the target scores all of them in one cached
forward pass of gamma + 1 positions, and rejection sampling keeps a prefix of the proposals plus
one token of the target's, so that the output is distributed exactly as the target's own samples
(greedy at temperature 0: token for token the target's greedy output).

    accept draft token d_i with probability min(1, p_i(d_i) / q_i(d_i));
    at the first rejection sample from norm(max(0, p_i - q_i)); if all are accepted, a bonus token from p_gamma

A whole call runs as one jitted program (the prefills, then a lax.while_loop over rounds: the
draft's gamma steps, the target's verification, the acceptance), so a round costs no dispatch and
no device-to-host read; at batch 1 on XLA:CPU those cost more than a small model's decode step
itself. After a round
both caches are rolled back to the accepted length by resetting their write index: the rejected
slots are overwritten before any query can see them, since a query only sees keys at earlier
slots. Rows of a batch share the cache's write index, so a round keeps the shortest accepted
prefix over the rows; a prefix of a valid speculative sample is still a valid sample, so this only
costs speed. `python -m jaxllm.generate --draft DIR --gamma K` is the command.

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
    """The distribution a token is sampled from at temperature > 0: the filtered softmax. (Greedy
    rounds compare argmaxes instead, see `SpeculativeGenerator.round`.)"""
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
        # Of the last `generate` call: rounds, drafted and accepted tokens (rows still running), seconds.
        self.last_stats: dict = {}

    def round(self, sampling: SamplingConfig, target_params, draft_params, t_cache, d_cache, prev_B, last_B,
              positions_B, slot, done_B, rng):
        """One draft-verify-accept round (traced inside `run`). `last_B` (at `positions_B`,
        cache slot `slot`) is the newest token, in neither cache yet; `prev_B` the one before it.
        Returns the tokens emitted [B, G1] (n + 1 of them are valid), n, each row's own accepted
        count, both caches (the target's rolled back to slot + n + 1) and the advanced rng."""
        G, B = self.gamma, last_B.shape[0]
        greedy = sampling.temperature == 0
        if greedy:  # no noise is drawn: the keys are never read
            draft_keys, accept_rng = [None] * G, None
        else:
            rng, draft_rng, accept_rng = jax.random.split(rng, 3)
            draft_keys = jax.random.split(draft_rng, G)

        def propose(logits_BV, key):
            """(q, the drafted token); greedy, the argmax alone (q, its one-hot, is never read)."""
            if greedy:
                return None, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            q_BV = probabilities(logits_BV, sampling)
            return q_BV, sample(q_BV, key)

        # The draft's first step takes [prev, last] at slots slot - 1, slot: the token at slot - 1
        # may not be in its cache (after a round whose G proposals were all accepted, d_G was never
        # fed); where it is, it is rewritten with the same keys and values. This saves the extra
        # draft step per round that feeding d_G would cost.
        d_cache = set_cache_index(d_cache, slot - 1)
        tokens_B2 = jnp.stack([prev_B, last_B], axis=1)
        logits_B2V, d_cache = self.draft.forward(draft_params, d_cache, tokens_B2, jnp.ones_like(tokens_B2),
                                                 positions_B[:, None] + jnp.array([-1, 0], jnp.int32))
        proposals = [propose(logits_B2V[:, 1], draft_keys[0])]
        # Unrolled (G is small and static): a lax.scan would carry the whole draft cache through
        # its loop.
        for i in range(1, G):
            logits_BV, d_cache = self.draft.decode_step(draft_params, d_cache, proposals[-1][1], positions_B + i)
            proposals.append(propose(logits_BV, draft_keys[i]))
        drafted_BG = jnp.stack([d for _, d in proposals], axis=1)

        tokens_BG1 = jnp.concatenate([last_B[:, None], drafted_BG], axis=1)
        positions_BG1 = positions_B[:, None] + jnp.arange(G + 1, dtype=jnp.int32)
        logits_BG1V, t_cache = self.target.forward(target_params, t_cache, tokens_BG1, jnp.ones_like(tokens_BG1),
                                                   positions_BG1)
        if greedy:
            # accept_drafts with one-hot p and q, without its random draws (which cost XLA:CPU
            # more than the comparison): the drafts that match the target's argmax are accepted up
            # to the first that does not, and the target's argmax follows.
            target_BG1 = jnp.argmax(logits_BG1V, axis=-1).astype(jnp.int32)
            n_B = jnp.argmin(jnp.append(drafted_BG == target_BG1[:, :G], jnp.zeros((B, 1), bool), axis=1), axis=1)
            n_B = n_B.astype(jnp.int32)
            correction_B = jnp.take_along_axis(target_BG1, n_B[:, None], axis=1)[:, 0]
        else:
            p_BG1V, q_BGV = probabilities(logits_BG1V, sampling), jnp.stack([q for q, _ in proposals], axis=1)
            n_B, correction_B = jax.vmap(accept_drafts)(p_BG1V, q_BGV, drafted_BG, jax.random.split(accept_rng, B))
        n = jnp.min(jnp.where(done_B, G, n_B))
        # Rows that accepted more than the shortest keep their accepted draft token at n.
        j = jnp.arange(G + 1)
        drafted_BG1 = jnp.concatenate([drafted_BG, correction_B[:, None]], axis=1)
        at_n_B = jnp.where(n_B > n, drafted_BG1[:, n], correction_B)
        emitted_BG1 = jnp.where(j < n, drafted_BG1, jnp.where(j == n, at_n_B[:, None], self.target.pad_id))
        emitted_BG1 = jnp.where(done_B[:, None], self.target.pad_id, emitted_BG1)
        return emitted_BG1, n, n_B, set_cache_index(t_cache, slot + n + 1), d_cache, rng

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(self, sampling: SamplingConfig, target_params, draft_params, tokens_BP, segment_ids_BP, positions_BP,
            lengths_B, done_B, rng):
        """The whole generation as one program: both prefills, the first token, then every round
        until each row is done or has max_new_tokens (a lax.while_loop), so that neither a round
        nor the setup costs a dispatch or a device-to-host read (XLA:CPU, batch 1, distill_tiny's
        teacher: ~1.4-2 ms a dispatched decode step and read, ~0.4 ms a step inside a loop).
        Returns the tokens [B, max_new + G1] (padding after each row's end) and the round
        statistics."""
        target, draft, G, max_new = self.target, self.draft, self.gamma, sampling.max_new_tokens
        B, P = tokens_BP.shape
        # The last round may write G + 1 slots past max_new_tokens.
        T = P + max_new + G + 1
        target_params, draft_params = target.decode_params(target_params), draft.decode_params(draft_params)
        last_slot_B = jnp.full((B,), P - 1, jnp.int32)
        logits_BV, t_cache = target.prefill(target_params, target.init_cache(B, T), tokens_BP, segment_ids_BP,
                                            positions_BP, last_slot_B)
        _, d_cache = draft.prefill(draft_params, draft.init_cache(B, T), tokens_BP, segment_ids_BP, positions_BP,
                                   last_slot_B)
        last_B, done_B, rng = target.choose(sampling, logits_BV, done_B, rng)
        zero = jnp.zeros((), jnp.int32)
        state = dict(out_BM=jnp.full((B, max_new + G + 1), target.pad_id, jnp.int32).at[:, 0].set(last_B),
                     count=zero + 1, prev_B=tokens_BP[:, -1], last_B=last_B, positions_B=lengths_B, slot=zero + P,
                     done_B=done_B, rng=rng, rounds=zero, drafted=zero, accepted=zero, emitted=zero)

        def unfinished(carry):
            s = carry[2]
            return (s["count"] < max_new) & ~jnp.all(s["done_B"])

        def one_round(carry):
            t_cache, d_cache, s = carry
            emitted_BG1, n, n_B, t_cache, d_cache, rng = self.round(
                sampling, target_params, draft_params, t_cache, d_cache, s["prev_B"], s["last_B"],
                s["positions_B"], s["slot"], s["done_B"], s["rng"])
            running_B = ~s["done_B"]
            rows = jnp.sum(running_B, dtype=jnp.int32)
            done_B = s["done_B"]
            if sampling.stop_at_eos:
                done_B = done_B | jnp.any((emitted_BG1 == target.eos_id) & (jnp.arange(G + 1) <= n), axis=1)
            # The token at the new slot - 1: the n-th accepted draft, or the old newest token.
            prev_B = jnp.where(n > 0, emitted_BG1[:, jnp.maximum(n - 1, 0)], s["last_B"])
            s = dict(out_BM=jax.lax.dynamic_update_slice(s["out_BM"], emitted_BG1, (0, s["count"])),
                     count=s["count"] + n + 1, prev_B=prev_B, last_B=emitted_BG1[:, n],
                     positions_B=s["positions_B"] + n + 1, slot=s["slot"] + n + 1, done_B=done_B, rng=rng,
                     rounds=s["rounds"] + 1, drafted=s["drafted"] + G * rows,
                     accepted=s["accepted"] + jnp.sum(jnp.where(running_B, n_B, 0)),
                     emitted=s["emitted"] + (n + 1) * rows)
            return t_cache, d_cache, s

        state = jax.lax.while_loop(unfinished, one_round, (t_cache, d_cache, state))[2]
        return state["out_BM"], {k: state[k] for k in ("rounds", "drafted", "accepted", "emitted")}

    def generate(self, target_params, draft_params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, rng):
        """Generated token ids per prompt (without the prompt, cut after EOS), as
        `Generator.generate` returns them; `last_stats` holds the acceptance figures."""
        target = self.target
        n_prompts = len(prompts)
        prompts = list(prompts) + [target.filler] * (-n_prompts % target._batch_multiple())
        tokens, segment_ids, positions, lengths = pad_prompts(prompts, "left", target.pad_id)
        done = np.zeros(len(prompts), bool)
        done[n_prompts:] = True
        start = time.perf_counter()
        out_BM, stats = jax.device_get(target._run(
            self.run, sampling, target_params, draft_params,
            *(target._place(x) for x in (tokens, segment_ids, positions, lengths, done)), rng))
        stats = {k: int(v) for k, v in stats.items()}
        stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
        stats["tokens_per_round"] = stats["emitted"] / max(stats["rounds"] * n_prompts, 1)
        stats["seconds"] = time.perf_counter() - start
        self.last_stats = stats
        results = []
        for row in out_BM[:n_prompts, :sampling.max_new_tokens]:
            row = list(row)
            end = row.index(target.eos_id) + 1 if sampling.stop_at_eos and target.eos_id in row else len(row)
            # Generated padding is dropped, as Generator.generate drops it.
            results.append([int(t) for t in row[:end] if t != target.pad_id or t == target.eos_id])
        return results
