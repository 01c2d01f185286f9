"""Continuous batching: many prompts of mixed lengths decoded together in a fixed number of rows
(slots) of one KV cache. Every row keeps its own length in the cache (a per-row write index, see
layers/attention.py), so when a row's sequence finishes (EOS or max_new_tokens) the next waiting
prompt is prefilled on its own and copied into that row's slot while the other rows go on; the
batch never waits for its longest member, and no row is padded to another's length.

    python -m jaxllm.generate --workdir runs/tiny_lm --prompts_file prompts.txt --slots 8

At temperature 0 the outputs equal one-at-a-time decoding token for token (tests/batching_test.py).

Shape legend as in decoding.py; R the slots (rows of the cache).
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.decoding import Generator, SamplingConfig


def per_row_index(cache, rows: int):
    """`cache` with each layer's write index replaced by one index per row, all 0."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros((rows,), jnp.int32) if getattr(path[-1], "key", None) == "index" else x, cache)


class ContinuousBatcher:
    """Decodes a list of prompts in `slots` cache rows, refilling a row as soon as its sequence ends.

    A new prompt is prefilled alone, right-padded to a multiple of `bucket` tokens (so that the
    prefill compiles once per bucket, not once per length); the padding is masked, and the row's
    index is set to the real length, so generated tokens overwrite it."""

    def __init__(self, model_cfg: ModelConfig, slots: int, bucket: int = 16, mesh: jax.sharding.Mesh | None = None):
        self.gen = Generator(model_cfg, mesh)
        if slots < 1 or bucket < 1:
            raise ConfigError(f"slots={slots}, bucket={bucket}: both must be 1 or more")
        # Rows split over the mesh's batch axes: rounded up to a multiple of their size.
        multiple = self.gen._batch_multiple()
        self.slots, self.bucket = -(-slots // multiple) * multiple, bucket
        # Of the last `generate` call: decode steps, seconds, generated tokens.
        self.last_stats: dict = {}

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
    def insert(self, cache, row_cache, row, length):
        """`cache` with row `row` replaced by the one-row `row_cache`, its index set to `length`."""
        def visit(path, big, small):
            if getattr(path[-1], "key", None) == "index":
                return big.at[row].set(length)
            # A one-row cache has N rows in the [B·N, S, K] arrays, 1 in segment_ids [B, S].
            start = (row * small.shape[0],) + (0,) * (big.ndim - 1)
            return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)
        return jax.tree_util.tree_map_with_path(visit, cache, row_cache)

    def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, rng,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[int]]:
        """The generated token ids per prompt, in the prompts' order (without the prompt, cut after
        EOS), as `Generator.generate` returns them. `max_new_tokens`: a limit per prompt (each at
        most sampling.max_new_tokens), as requests to a server each bring their own."""
        gen, R = self.gen, self.slots
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (BOS counts)")
        limits = [sampling.max_new_tokens] * len(prompts) if max_new_tokens is None else list(max_new_tokens)
        if len(limits) != len(prompts) or not all(0 <= n <= sampling.max_new_tokens for n in limits):
            raise ValueError(f"max_new_tokens needs one limit in [0, {sampling.max_new_tokens}] per prompt")
        if sampling.max_new_tokens == 0:
            return [[] for _ in prompts]
        start_time = time.perf_counter()
        padded = lambda n: -(-n // self.bucket) * self.bucket  # noqa: E731
        S = padded(max(len(p) for p in prompts)) + sampling.max_new_tokens
        params = gen._run(gen.decode_params, params)
        cache = per_row_index(gen.init_cache(R, S), R)
        waiting = collections.deque(range(len(prompts)))
        outputs: list = [None] * len(prompts)
        row_prompt, row_out = [-1] * R, [[] for _ in range(R)]
        tokens, positions, done = np.full(R, gen.pad_id, np.int32), np.zeros(R, np.int32), np.ones(R, bool)
        stats = {"decode_steps": 0, "prefills": 0}

        def finished(row: int) -> bool:
            out = row_out[row]
            return len(out) >= limits[row_prompt[row]] or (sampling.stop_at_eos and out[-1] == gen.eos_id)

        def admit(row: int):
            nonlocal cache, rng
            i = waiting.popleft()
            prompt = prompts[i]
            P, Pb = len(prompt), padded(len(prompt))
            tokens_1P = np.full((1, Pb), gen.pad_id, np.int32)
            tokens_1P[0, :P] = prompt
            segments_1P = (np.arange(Pb) < P).astype(np.int32)[None]
            positions_1P = np.minimum(np.arange(Pb), P - 1).astype(np.int32)[None]
            logits_1V, row_cache = gen._run(gen.prefill, params, gen.init_cache(1, S), tokens_1P, segments_1P,
                                            positions_1P, np.array([P - 1], np.int32))
            cache = gen._run(self.insert, cache, row_cache, row, P)
            token_1, _, rng = gen._run(gen.choose, sampling, logits_1V, jnp.zeros(1, bool), rng)
            row_prompt[row], row_out[row] = i, [int(token_1[0])]
            tokens[row], positions[row], done[row] = int(token_1[0]), P, False
            stats["prefills"] += 1

        def refill(row: int):
            """Retires the row's finished sequences and admits waiting prompts until one runs."""
            while not done[row] and finished(row):
                outputs[row_prompt[row]] = row_out[row]
                done[row] = True
                if waiting:
                    admit(row)

        for row in range(R):
            if waiting:
                admit(row)
                refill(row)
        while not done.all():
            new_R, _, _, rng, cache = gen._run(gen.decode_and_choose, sampling, params, cache, *map(
                gen._place, (tokens, positions, done)), rng)
            new_R = np.asarray(new_R)
            stats["decode_steps"] += 1
            positions = positions + 1
            for row in np.flatnonzero(~done):
                row_out[row].append(int(new_R[row]))
                tokens[row] = new_R[row]
                refill(row)
        stats["seconds"] = time.perf_counter() - start_time
        results = []
        for out, limit in zip(outputs, limits):
            out = out[:limit]  # a limit of 0 still had its first token drawn
            if sampling.stop_at_eos and gen.eos_id in out:
                out = out[:out.index(gen.eos_id) + 1]
            results.append([t for t in out if t != gen.pad_id])  # as Generator.generate drops padding
        stats["generated_tokens"] = sum(len(r) for r in results)
        self.last_stats = stats
        return results
