"""Speculative decoding vs plain decoding of the target: tokens/s and acceptance rate, with the
distilled student of experiments/distill_tiny.py as the draft and with an untrained draft of the
student's shape. One JSON object per line.

    python experiments/distill_tiny.py                    # the teacher and the distilled student, if missing
    python experiments/distill_tiny_draft.py              # a student distilled to draft (--draft runs/distill_tiny_draft)
    python benchmarks/speculative.py [--target runs/distill_tiny_teacher] [--draft runs/distill_tiny]
                                     [--gammas 2,4] [--new_tokens 64] [--repeats 3] [--breakdown]

Batch 1, one prompt at a time (prompts of one length, cut from the stdlib corpus, so that every
configuration compiles once). Every configuration runs once untimed (compilation), then the
configurations take turns --repeats times; the median of the repeats' total seconds is reported.
At temperature 0 `same_as_plain` checks the output is the target's greedy output token for token.

"plain" is jaxllm's generation path (`Generator.generate`: the prefill, then every decode step
in one jitted loop), the baseline of `speedup_vs_plain`. "plain_fused" is a reference only: the
decode steps in this file's own fori_loop (from when `generate` read each token back to the
host; the two now differ by the noise and a few dispatches). `--breakdown` also prints the cost of the
pieces (one line, milliseconds): a decode step of the target and of the draft, dispatched alone and
inside a jitted loop, the draft's 2-position first step and the target's gamma + 1 position
verification inside a loop, the prefill of the first prompt (dispatched), a token of
`Generator.generate`, a speculative round (slope over the calls' rounds), and the traces and
compilations further speculative calls trigger (0: no retracing).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import data, decoding, restore, speculative
from jaxllm.models import Transformer

PROMPTS = ["import os\nimport sys\n\n\ndef ", "class Parser:\n    def __init__(self, ",
           "    for name in names:\n        if ", "    return self._cache[key]\n\n\ndef ",
           "        except KeyError:\n            ", "# Copyright 2001 Python Software Fo"]
PROMPT_CHARS = 30


def prompt_ids(count: int = len(PROMPTS)) -> list[list[int]]:
    """The first `count` built-in prompts as token ids (BOS, then their first PROMPT_CHARS bytes)."""
    return [[data.BOS_ID] + list(p[:PROMPT_CHARS].encode()) for p in PROMPTS[:count]]


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def fused_steps(gen: decoding.Generator, sampling, params, cache, tokens_B, positions_B, done_B, rng):
    """max_new_tokens - 1 of `gen`'s decode_and_choose steps in one lax.fori_loop: the tokens
    [B, max_new] and the cache."""
    out_BM = jnp.zeros((tokens_B.shape[0], sampling.max_new_tokens), jnp.int32).at[:, 0].set(tokens_B)

    def step(t, carry):
        out_BM, tokens_B, positions_B, done_B, rng, cache = carry
        tokens_B, positions_B, done_B, rng, cache = gen.decode_and_choose(sampling, params, cache, tokens_B,
                                                                          positions_B, done_B, rng)
        return out_BM.at[:, t].set(tokens_B), tokens_B, positions_B, done_B, rng, cache

    # The cache is returned too, so that the donated one is the loop's buffer.
    carry = jax.lax.fori_loop(1, sampling.max_new_tokens, step, (out_BM, tokens_B, positions_B, done_B, rng, cache))
    return carry[0], carry[-1]


def fused_plain(gen: decoding.Generator, params, prompt, sampling, rng):
    """`gen.generate(params, [prompt], ...)[0]` (no EOS stop) with the decode steps in one program."""
    tokens, segment_ids, positions, lengths = decoding.pad_prompts([prompt], "left", gen.pad_id)
    B, P = tokens.shape
    params = gen.decode_params(params)
    logits_BV, cache = gen.prefill(params, gen.init_cache(B, P + sampling.max_new_tokens), tokens, segment_ids,
                                   positions, np.full(B, P - 1, np.int32))
    tokens_B, done_B, rng = gen.choose(sampling, logits_BV, jnp.zeros(B, bool), rng)
    out = np.asarray(fused_steps(gen, sampling, params, cache, tokens_B, jnp.asarray(lengths), done_B, rng)[0])
    return [int(t) for t in out[0] if t != gen.pad_id]


def median_ms(fn, repeats=30):
    """Median wall milliseconds of fn() (which blocks), after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def breakdown(target_cfg, target_params, draft_cfg, draft_params, untrained_params, prompt, sampling, gammas):
    """Milliseconds of the pieces of plain and speculative decoding at batch 1 (see the docstring)."""
    record = {"benchmark": "speculative_breakdown", "temperature": sampling.temperature}
    T = len(prompt) + sampling.max_new_tokens + max(gammas) + 1
    steps = 32
    for name, cfg, params in (("target", target_cfg, target_params), ("draft", draft_cfg, draft_params)):
        gen = decoding.Generator(cfg)
        params = gen.decode_params(params)
        token_B, position_B = jnp.array([65], jnp.int32), jnp.array([len(prompt)], jnp.int32)
        # A step as the plain generator runs it: one dispatch, then the device-to-host read (31
        # steps from slot 8, within the cache).
        state = {"cache": speculative.set_cache_index(gen.init_cache(1, T), 8)}

        def dispatched():
            logits, state["cache"] = gen.decode_step(params, state["cache"], token_B, position_B)
            np.asarray(logits)

        record[f"{name}_step_dispatched_ms"] = median_ms(dispatched)
        tokens, segment_ids, positions, _ = decoding.pad_prompts([prompt])
        last_slot = np.array([len(prompt) - 1], np.int32)
        record[f"{name}_prefill_ms"] = median_ms(lambda: jax.block_until_ready(gen.prefill(
            params, gen.init_cache(1, T), tokens, segment_ids, positions, last_slot)), 10)

        # The params are arguments, as in the generators' programs (closed over, XLA would fold
        # their layout changes into constants).
        @jax.jit
        def looped(params, cache):
            def body(i, cache):
                return gen.decode_step(params, speculative.set_cache_index(cache, 8 + i), token_B, position_B + i)[1]
            return jax.lax.fori_loop(0, steps, body, cache)

        def in_loop():
            state["cache"] = looped(params, state["cache"])
            jax.block_until_ready(state["cache"])

        record[f"{name}_step_in_loop_ms"] = median_ms(in_loop, 10) / steps
        # The positions a forward pass takes at once: the draft's first step of a round takes 2,
        # the target's verification gamma + 1.
        for L in [2] if name == "draft" else [g + 1 for g in gammas]:
            tokens_BL = jnp.full((1, L), 65, jnp.int32)

            @jax.jit
            def multi_loop(params, cache, tokens_BL=tokens_BL):
                def body(i, cache):
                    return gen.forward(params, speculative.set_cache_index(cache, 8 + i), tokens_BL,
                                       jnp.ones_like(tokens_BL), position_B[:, None] + i + jnp.arange(L))[1]
                return jax.lax.fori_loop(0, steps, body, cache)

            def multi():
                state["cache"] = multi_loop(params, state["cache"])
                jax.block_until_ready(state["cache"])

            record[f"{name}_{L}_positions_in_loop_ms"] = median_ms(multi, 10) / steps
        plain_times = []
        for _ in range(3):
            gen.generate(params, [prompt], sampling, jax.random.key(0))
            plain_times.append(gen.last_timings["decode_s"] / max(gen.last_timings["tokens_per_row"] - 1, 1))
        record[f"{name}_plain_generate_token_ms"] = 1000 * statistics.median(plain_times)
    for gamma in gammas:
        spec = speculative.SpeculativeGenerator(target_cfg, draft_cfg, gamma)
        for params in (draft_params, untrained_params):  # compiles (the two differ in sharding)
            spec.generate(target_params, params, [prompt], sampling, jax.random.key(0))
        events = []
        listener = lambda event, duration, **kw: events.append(event)  # noqa: E731
        jax.monitoring.register_event_duration_secs_listener(listener)
        # A round's cost without the call's own (prefills, dispatch, reads): the slope of a call's
        # seconds over its round count, between the draft and the untrained one (more rounds).
        medians = []
        for params in (draft_params, untrained_params):
            seconds = []
            for i in range(5):
                spec.generate(target_params, params, [prompt], sampling, jax.random.key(0))
                seconds.append(spec.last_stats["seconds"])
            medians.append((spec.last_stats["rounds"], statistics.median(seconds)))
            if params is draft_params:
                record[f"gamma{gamma}_tokens_per_round"] = spec.last_stats["tokens_per_round"]
                record[f"gamma{gamma}_call_ms"] = 1000 * medians[0][1]
                record[f"gamma{gamma}_rounds_per_call"] = medians[0][0]
        (r1, t1), (r2, t2) = medians
        record[f"gamma{gamma}_round_ms"] = 1000 * (t2 - t1) / (r2 - r1) if r2 != r1 else None
        jax.monitoring.unregister_event_duration_listener(listener)
        record[f"gamma{gamma}_traces_and_compiles_in_10_more_calls"] = sum(
            e.endswith(("jaxpr_trace_duration", "backend_compile_duration")) for e in events)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="runs/distill_tiny_teacher")
    parser.add_argument("--draft", default="runs/distill_tiny")
    parser.add_argument("--gammas", default="2,4")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the pieces (decode steps, verification, prefills, rounds)")
    args = parser.parse_args()
    target_cfg, target_params = restore.load_params(args.target)
    draft_cfg, draft_params = restore.load_params(args.draft)
    untrained = nn.meta.unbox(
        Transformer(draft_cfg.model).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts = prompt_ids(args.prompts)
    gammas = [int(g) for g in args.gammas.split(",")]

    for temperature in (float(t) for t in args.temperatures.split(",")):
        sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=temperature, stop_at_eos=False)
        plain = decoding.Generator(target_cfg.model)
        runs = {"plain": lambda p, k: (plain.generate(target_params, [p], sampling, k)[0], None),
                "plain_fused": lambda p, k: (fused_plain(plain, target_params, p, sampling, k), None)}
        for gamma in gammas:
            spec = speculative.SpeculativeGenerator(target_cfg.model, draft_cfg.model, gamma)
            for name, params in (("distilled", draft_params), ("untrained", untrained)):
                def run(p, k, spec=spec, params=params):
                    return spec.generate(target_params, params, [p], sampling, k)[0], dict(spec.last_stats)
                runs[f"{name}_gamma{gamma}"] = run
        seconds = {name: [] for name in runs}
        outputs, stats = {}, {name: [] for name in runs}
        for repeat in range(args.repeats + 1):  # repeat 0 compiles
            for name, run in runs.items():
                start = time.perf_counter()
                results = [run(p, jax.random.key(i)) for i, p in enumerate(prompts)]
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
                    stats[name] = [s for _, s in results]
                outputs[name] = [out for out, _ in results]
        tokens = sum(len(out) for out in outputs["plain"])
        plain_s = statistics.median(seconds["plain"])
        for name in runs:
            s = statistics.median(seconds[name])
            record = {"benchmark": "speculative", "config": name, "temperature": temperature,
                      "prompts": len(prompts), "new_tokens": args.new_tokens, "tokens_per_s": tokens / s,
                      "speedup_vs_plain": plain_s / s, "seconds": seconds[name]}
            if stats[name][0] is not None:
                drafted = sum(x["drafted"] for x in stats[name])
                record["acceptance_rate"] = sum(x["accepted"] for x in stats[name]) / drafted
                record["tokens_per_round"] = statistics.mean(x["tokens_per_round"] for x in stats[name])
            if temperature == 0:
                record["same_as_plain"] = outputs[name] == outputs["plain"]
            print(json.dumps(record), flush=True)
        if args.breakdown:
            print(json.dumps(breakdown(target_cfg.model, target_params, draft_cfg.model, draft_params, untrained,
                                       prompts[0], sampling, gammas)), flush=True)
    print(json.dumps({"benchmark": "speculative", "target": args.target, "draft": args.draft,
                      "target_params": sum(x.size for x in jax.tree.leaves(target_params)),
                      "draft_params": sum(x.size for x in jax.tree.leaves(draft_params)),
                      "devices": str(jax.devices())}), flush=True)


if __name__ == "__main__":
    main()
