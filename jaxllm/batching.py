"""Continuous batching: many prompts of mixed lengths decoded together in a fixed number of rows
(slots) of one KV cache. Every row keeps its own length in the cache (a per-row write index, see
layers/attention.py), so when a row's sequence finishes (EOS or its own max_new_tokens) the next
waiting prompt takes that row's slot while the other rows go on; the batch never waits for its
longest member, and no row is padded to another's length.

    python -m jaxllm.generate --workdir runs/tiny_lm --prompts_file prompts.txt --slots 8

The decode loop runs on device: one jitted `lax.while_loop` keeps every row's last token, position,
done flag and remaining-token count in device arrays and decodes until a row finishes while
prompts wait (or `steps_per_call` steps pass); only then does the host read the new tokens and
admit waiting prompts into the free rows with one batched prefill and insert. So the host works
once per admission, not once per token (a host round trip per token cost 60 % more than the step
itself on a 2-core CPU, benchmarks/README.md).

At temperature 0 the outputs equal one-at-a-time decoding token for token (tests/batching_test.py).

Shape legend as in decoding.py; R the slots (rows of the cache), n the rows of one admission,
T the steps of one decode call.
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
        lambda path, x: jnp.zeros((rows,), jnp.int32) if _is_index(path) else x, cache)


def _is_index(path) -> bool:
    return getattr(path[-1], "key", None) == "index"


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class ContinuousBatcher:
    """Decodes a list of prompts in `slots` cache rows, refilling a row as soon as its sequence ends.

    Admitted prompts are prefilled together, right-padded to the longest one's bucket (the next power
    of two or 1.5 times one, at least `bucket` tokens: `padded_length`), and their row count rounded
    up to a power of two, so the prefill compiles once per (rows, length) bucket, not once per prompt
    length; the padding is masked, and each row's index is set to its real length, so generated
    tokens overwrite it. `steps_per_call` bounds the steps one decode call runs (the size of its
    token buffer)."""

    def __init__(self, model_cfg: ModelConfig, slots: int, bucket: int = 16, mesh: jax.sharding.Mesh | None = None,
                 steps_per_call: int = 64):
        self.gen = Generator(model_cfg, mesh)
        if slots < 1 or bucket < 1 or steps_per_call < 1:
            raise ConfigError(f"slots={slots}, bucket={bucket}, steps_per_call={steps_per_call}: "
                              "each must be 1 or more")
        # Rows split over the mesh's batch axes: rounded up to a multiple of their size.
        self.multiple = self.gen._batch_multiple()
        self.slots = -(-slots // self.multiple) * self.multiple
        self.bucket, self.steps_per_call = bucket, steps_per_call
        # Of the last `generate` call: decode steps, host calls, seconds, generated tokens.
        self.last_stats: dict = {}

    def padded_length(self, n: int) -> int:
        """The prefill length of an n-token prompt: the next power of two or 1.5 times one, at least
        `bucket` (one at a time, the 17,210 prompt tokens of benchmarks/README.md's 64 prompts pad
        to 20,048, against 23,136 with powers of two alone)."""
        power = _next_power_of_two(n)
        return max(self.bucket, 3 * power // 4 if 3 * power // 4 >= n and power >= 4 else power)

    def admission_rows(self, n: int) -> int:
        """Rows of a prefill admitting n prompts: a power of two (a multiple of the batch axes'
        size), at most the slots."""
        rows = -(-_next_power_of_two(n) // self.multiple) * self.multiple
        return min(rows, self.slots)

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
    def admit(self, sampling: SamplingConfig, params, cache, state, rng, tokens_nP, lengths_n, rows_n, limits_n):
        """Prefills the n prompts `tokens_nP` (right-padded, real lengths `lengths_n`) in a fresh
        n-row cache, draws each one's first token, and puts them into rows `rows_n` of `cache` and
        of the decode `state` (rows >= R are padding and dropped). Returns cache, state, rng and
        the first tokens [n]."""
        n, P = tokens_nP.shape
        slot_n = jnp.arange(P, dtype=jnp.int32)[None]
        segments_nP = (slot_n < lengths_n[:, None]).astype(jnp.int32)
        positions_nP = jnp.minimum(slot_n, lengths_n[:, None] - 1)
        logits_nV, small = self.gen.prefill(params, self.gen.init_cache(n, P), tokens_nP, segments_nP,
                                            positions_nP, lengths_n - 1)
        first_n, eos_n, rng = self.gen.choose(sampling, logits_nV, jnp.zeros(n, bool), rng)

        def insert(path, big, new):
            if _is_index(path):
                return big.at[rows_n].set(lengths_n, mode="drop")
            # [rows·X, S, ...] arrays (X = KV heads for keys and values, 1 for segment ids): row
            # r's first P slots take the new row's; its later slots, the last occupant's, stay
            # masked as they lie ahead of the row's index until decoding overwrites them.
            R, X = big.shape[0] // (new.shape[0] // n), new.shape[0] // n
            view = big.reshape(R, X, *big.shape[1:])
            view = view.at[rows_n, :, :P].set(new.reshape(n, X, *new.shape[1:]).astype(big.dtype), mode="drop")
            return view.reshape(big.shape)

        cache = jax.tree_util.tree_map_with_path(insert, cache, small)
        remaining_n = limits_n - 1  # the first token is drawn
        done_n = eos_n | (remaining_n <= 0)
        new_state = (first_n, lengths_n, done_n, remaining_n)
        state = tuple(x.at[rows_n].set(new, mode="drop") for x, new in zip(state, new_state))
        return cache, state, rng, first_n

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
    def decode(self, sampling: SamplingConfig, params, cache, state, rng, stop_when_any_done):
        """Decode steps on device until every row is done, or (with `stop_when_any_done`, when
        prompts wait) until some row is, or `steps_per_call` steps pass. Returns cache, state, rng,
        the tokens [R, T] (padding where a row was done), each row's tokens emitted [R] (the first
        ones of its buffer row) and the steps run."""
        R, T = self.slots, self.steps_per_call
        gen = self.gen

        def running(carry):
            step, (_, _, done_R, _), *_ = carry
            return (step < T) & ~jnp.all(done_R) & ~(stop_when_any_done & jnp.any(done_R))

        def step_fn(carry):
            step, (tokens_R, positions_R, done_R, remaining_R), rng, cache, out_RT, emitted_R = carry
            live_R = ~done_R
            # Every row's cache index advances each step, so positions do too; a done row's token
            # (padding) and position are never read before an admission replaces them.
            new_R, positions_R, done_R, rng, cache = gen.decode_and_choose(
                sampling, params, cache, tokens_R, positions_R, done_R, rng)
            out_RT = jax.lax.dynamic_update_slice(out_RT, new_R[:, None], (0, step))
            remaining_R = remaining_R - live_R
            state = (new_R, positions_R, done_R | (remaining_R <= 0), remaining_R)
            return step + 1, state, rng, cache, out_RT, emitted_R + live_R

        carry = (jnp.int32(0), state, rng, cache, jnp.full((R, T), gen.pad_id, jnp.int32), jnp.zeros(R, jnp.int32))
        steps, state, rng, cache, out_RT, emitted_R = jax.lax.while_loop(running, step_fn, carry)
        return cache, state, rng, out_RT, emitted_R, steps

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
        S = self.padded_length(max(len(p) for p in prompts)) + sampling.max_new_tokens
        params = gen._run(gen.decode_params, params)
        cache = per_row_index(gen.init_cache(R, S), R)
        # Per row: last token, position (= cache index), done, tokens still to draw.
        state = tuple(gen._place(x) for x in (np.full(R, gen.pad_id, np.int32), np.zeros(R, np.int32),
                                             np.ones(R, bool), np.zeros(R, np.int32)))
        waiting = collections.deque(range(len(prompts)))
        outputs: list = [None] * len(prompts)
        row_prompt, row_out = [-1] * R, [[] for _ in range(R)]
        done = np.ones(R, bool)  # the host's copy, as of the last read
        stats = {"decode_steps": 0, "decode_calls": 0, "prefills": 0, "prefill_calls": 0}
        while True:
            first = None
            free = [r for r in range(R) if done[r]]
            if waiting and free:
                admitted = [waiting.popleft() for _ in free[:len(waiting)]]
                n, P = self.admission_rows(len(admitted)), self.padded_length(max(len(prompts[i]) for i in admitted))
                tokens_nP = np.full((n, P), gen.pad_id, np.int32)
                lengths_n, rows_n, limits_n = np.ones(n, np.int32), np.full(n, R, np.int32), np.zeros(n, np.int32)
                for j, (i, row) in enumerate(zip(admitted, free)):
                    tokens_nP[j, :len(prompts[i])] = prompts[i]
                    lengths_n[j], rows_n[j], limits_n[j] = len(prompts[i]), row, limits[i]
                    row_prompt[row], row_out[row] = i, []
                cache, state, rng, first = gen._run(self.admit, sampling, params, cache, state, rng, *map(
                    gen._place, (tokens_nP, lengths_n, rows_n, limits_n)))
                stats["prefills"] += len(admitted)
                stats["prefill_calls"] += 1
                first_rows = free[:len(admitted)]
            elif done.all():
                break
            cache, state, rng, out_RT, emitted_R, steps = gen._run(
                self.decode, sampling, params, cache, state, rng, np.bool_(bool(waiting)))
            # The one device-to-host read per call (the first tokens of an admission included).
            out_RT, emitted_R, steps, done, first = jax.device_get((out_RT, emitted_R, steps, state[2], first))
            stats["decode_steps"] += int(steps)
            stats["decode_calls"] += 1
            if first is not None:
                for j, row in enumerate(first_rows):
                    row_out[row].append(int(first[j]))
            for row in range(R):
                if emitted_R[row]:
                    row_out[row].extend(out_RT[row, :emitted_R[row]].tolist())
                if done[row] and row_prompt[row] >= 0:
                    outputs[row_prompt[row]], row_prompt[row] = row_out[row], -1
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
