"""Sampling with a KV cache: one prefill over the (left- or right-padded) prompts, then one jitted
program per new token (decode step and sampling together). Greedy, temperature, top-k and top-p;
batched prompts of different lengths; each sequence stops at EOS; optionally sharded over a mesh's
batch and tensor axes; float or int8/int4-quantized params (compression.quantize). The command line is
`python -m jaxllm.generate` (jaxllm/cli/generate.py).

Shape legend: B batch, P prompt length, S cache length, V vocab, I image (prefix) tokens, D width.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import data, restore, sharding
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config, ConfigError, ModelConfig
from jaxllm.layers import ATTENTION_KINDS
from jaxllm.layers.base import compute_dtype
from jaxllm.models import vlm
from jaxllm.models.transformer import Transformer, dense_prefix, group_size


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    stop_at_eos: bool = True


PADDING_SIDES = ("left", "right")


def pad_prompts(prompts: Sequence[Sequence[int]], side: str = "left", pad_id: int = data.PAD_ID):
    """Pads token lists to one length on `side`: tokens [B, P], segment ids (0 on padding),
    positions counted from each prompt's first real token, and each prompt's length [B]."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {PADDING_SIDES}, got {side!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS counts)")
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        real = slice(P - len(p), P) if side == "left" else slice(0, len(p))
        tokens[i, real] = p
        segment_ids[i, real] = 1
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    return tokens, segment_ids, positions, lengths


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = data.PAD_ID):
    """Left-padded tokens, segment ids and positions (see `pad_prompts`)."""
    return pad_prompts(prompts, "left", pad_id)[:3]


def filter_logits(logits_BV, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_desc, keep, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
    return logits_BV


def choose_tokens(logits_BV, rng, sampling: SamplingConfig):
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BV, sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def unstack_layers(cfg: ModelConfig, params):
    """The params of a scanned model (`cfg.scan_layers`: blocks stacked along a leading layers
    axis) in the layout of the unscanned one, block_0 .. block_{n-1}; params already in that
    layout come back as they are. Float or int8/int4-quantized.

    With model.moe.every = k > 1 the scan runs over groups of k blocks, `blocks/block_j` holding
    position j of every group, so block j of group g becomes block_{g·k + j} (the MoE blocks land
    where the unscanned model puts them, at (i + 1) % k == 0)."""
    if "blocks" not in params:
        return params
    k = group_size(cfg)
    first = dense_prefix(cfg)  # unscanned dense blocks before the scan keep their names
    out = {name: value for name, value in params.items() if name != "blocks"}
    for g in range((cfg.num_layers - first) // k):
        for j in range(k):
            stacked = params["blocks"][f"block_{j}"] if k > 1 else params["blocks"]
            out[f"block_{first + g * k + j}"] = jax.tree.map(lambda x: x[g], stacked)
    return out


def narrow_projections(params, dtype):
    """`params` with the attention's (q, k, v, o) and gated MLP's (gate, up, down) float kernels
    cast to `dtype`, the compute dtype, where they are wider. The matmuls cast them to it anyway,
    so no result changes; done inside every call, a standalone decode step on TPU reads the
    float32 kernels and writes and reads bfloat16 copies at every step (a decode loop hoists the
    conversion, but keeps the copy for the call). Kernels with adapters (LoRA) and quantized ones
    stay as they are."""
    def narrow(w):
        return w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) and w.dtype.itemsize > dtype.itemsize else w

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {name: walk(value) for name, value in tree.items()}
        for names, rank in ((("q", "k", "v", "o"), 3), (("gate", "up", "down"), 2)):
            # Plain arrays of the layers' own kernels: quantized (dicts), adapted and MoE expert
            # ([E, D, F]) kernels are left as they are.
            if set(names) <= out.keys() and all(isinstance(out[n], (jax.Array, np.ndarray)) and out[n].ndim == rank
                                                for n in names):
                out.update({n: narrow(out[n]) for n in names})
        return out

    return walk(params)


class Generator:
    """Holds the jitted prefill and decode step for one model config; reuse across calls.

    With a `mesh`, every call runs under it: prompts, cache and logits are split over the batch
    axes and the KV heads over `tensor` (the params must already be sharded on that mesh, as
    `load_params` returns them). Params may be float or int8/int4-quantized (jaxllm.quantize).

    Decoding always runs the blocks unrolled, each with its own cache, whether or not the model
    was trained with `scan_layers`: under nn.scan the cache is one [layers, ...] array carried
    through the loop, and XLA copies all of it at every step (tiny_lm, batch 8, 640 cache slots:
    22 ms per step scanned, 3.3 ms unrolled). `generate` converts the params once per call
    (`decode_params`: blocks unstacked, projection kernels in the compute dtype; a copy of the
    weights while it runs, unless the caller converted them once, as `python -m jaxllm.generate`
    does); `forward`, `prefill` and `decode_step` also take them as they are, at the price of
    slicing and casting the weights inside every call.
    """

    def __init__(self, model_cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None):
        if not ATTENTION_KINDS.get(model_cfg.attention_kind).decodes:
            raise ConfigError(f"model.attention_kind={model_cfg.attention_kind} does not generate text "
                              "(every token sees the whole sequence); sample from a causal model")
        tok = tokenizer_lib.load(model_cfg.tokenizer)
        self.pad_id = tok.pad_or_eos
        self.eos_id = -1 if tok.eos_id is None else tok.eos_id  # -1: no token ends a sequence
        self.filler = [tok.bos_id if tok.bos_id is not None else self.pad_id]
        # Decoding needs no remat.
        self.model_cfg = dataclasses.replace(model_cfg, remat="none")
        self.model = Transformer(dataclasses.replace(self.model_cfg, scan_layers=False), decode=True)
        self.full_model = Transformer(self.model_cfg)
        self.mesh = mesh
        # Wall-clock seconds of the last `generate` call, for benchmarks: the prompt pass to the
        # first token ("prefill_s") and each following step ("step_s"); with the cache also the
        # whole decode loop ("decode_s", "tokens_per_row" tokens including the first), of which
        # each step's entry is an equal share.
        self.last_timings: dict = {}
        self._cache_shapes: dict = {}

    def _run(self, fn, *args):
        if self.mesh is None:
            return fn(*args)
        with sharding.activate(self.mesh):
            return fn(*args)

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return sharding.axis_size(self.mesh, sharding.BATCH_AXES)

    def _place(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        # Rows over the batch axes; a spec shorter than the array leaves the other axes whole.
        spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

    def init_cache(self, batch: int, length: int):
        # The shapes come from tracing the model (~0.2 s on a loaded 2-core CPU), so they are kept
        # per size: continuous batching makes a one-row cache for every prompt it admits.
        if (batch, length) not in self._cache_shapes:
            tokens = jnp.zeros((batch, length), jnp.int32)
            self._cache_shapes[batch, length] = jax.eval_shape(
                lambda: self.model.init(jax.random.key(0), tokens))["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._cache_shapes[batch, length])

    @functools.partial(jax.jit, static_argnums=0)
    def decode_params(self, params):
        """`params` in the layout the decoding model takes (see `unstack_layers`, `narrow_projections`)."""
        return narrow_projections(unstack_layers(self.model_cfg, params), compute_dtype(self.model_cfg))

    @functools.partial(jax.jit, static_argnums=0)
    def forward(self, params, cache, tokens_BL, segment_ids_BL, positions_BL, prefix_BL=None, prefix_embeds=None):
        """Runs L tokens (after the `prefix_embeds`, if any) through the model, appending them to
        the cache; returns logits, cache."""
        variables = {"params": unstack_layers(self.model_cfg, params), "cache": cache}
        logits, updated = self.model.apply(
            variables, tokens_BL, segment_ids_BL, positions_BL, prefix_BL=prefix_BL,
            prefix_embeds_BID=prefix_embeds, mutable=["cache"]
        )
        return logits, updated["cache"]

    # prefill and decode_step donate the cache they are given, so that XLA updates it in place
    # instead of copying all of it at every step; the caller goes on with the returned one.
    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def prefill(self, params, cache, tokens_BP, segment_ids_BP, positions_BP, last_B, prefix_BP=None,
                prefix_embeds=None):
        """The prompt pass: fills the cache; returns the logits at each prompt's last token."""
        logits, cache = self.forward(params, cache, tokens_BP, segment_ids_BP, positions_BP, prefix_BP, prefix_embeds)
        return jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0], cache

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def decode_step(self, params, cache, tokens_B, positions_B):
        """One new token per row at the next cache slot; the same compiled function every step."""
        ones = jnp.ones_like(tokens_B)[:, None]
        logits, cache = self.forward(params, cache, tokens_B[:, None], ones, positions_B[:, None])
        return logits[:, 0], cache

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def choose(self, sampling: SamplingConfig, logits_BV, done_B, rng):
        """The next token of every row from its logits (padding for rows already done), the rows
        done after it, and the advanced rng."""
        rng, step_rng = jax.random.split(rng)
        tokens_B = jnp.where(done_B, self.pad_id, choose_tokens(logits_BV, step_rng, sampling))
        if sampling.stop_at_eos:
            done_B = done_B | (tokens_B == self.eos_id)
        return tokens_B, done_B, rng

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
    def decode_and_choose(self, sampling: SamplingConfig, params, cache, tokens_B, positions_B,
                          done_B, rng):
        """`decode_step` and `choose` as one program: a generated token costs one dispatch and
        one small device-to-host copy, with tokens, positions and done flags staying on device
        (on a GPU, where the step of a small model takes well under a millisecond, running the
        sampling as separate eager ops doubled the time per token)."""
        logits_BV, cache = self.decode_step(params, cache, tokens_B, positions_B)
        tokens_B, done_B, rng = self.choose(sampling, logits_BV, done_B, rng)
        return tokens_B, positions_B + 1, done_B, rng, cache

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
    def decode_loop(self, sampling: SamplingConfig, params, cache, tokens_B, positions_B, done_B, rng):
        """The generated tokens [B, max_new_tokens] from the first one on (padding after a row is
        done), the number of steps taken and the cache, in one program: `decode_and_choose` in a
        while loop that stops at max_new_tokens or when every row is done. A host round trip per
        token cost a small model on XLA:CPU 0.7-1 ms, more than its decode step (benchmarks/README,
        speculative decoding)."""
        B, N = tokens_B.shape[0], sampling.max_new_tokens
        out_BN = jnp.full((B, N), self.pad_id, jnp.int32).at[:, 0].set(tokens_B)

        def more(carry):
            t, done_B = carry[0], carry[3]
            return (t + 1 < N) & ~(sampling.stop_at_eos & jnp.all(done_B))

        def step(carry):
            t, tokens_B, positions_B, done_B, rng, cache, out_BN = carry
            tokens_B, positions_B, done_B, rng, cache = self.decode_and_choose(
                sampling, params, cache, tokens_B, positions_B, done_B, rng)
            return t + 1, tokens_B, positions_B, done_B, rng, cache, out_BN.at[:, t + 1].set(tokens_B)

        carry = (jnp.zeros((), jnp.int32), tokens_B, positions_B, done_B, rng, cache, out_BN)
        t, *_, cache, out_BN = jax.lax.while_loop(more, step, carry)
        return out_BN, t + 1, cache  # the cache returned so that it updates in the donated buffers

    @functools.partial(jax.jit, static_argnums=0)
    def recompute_step(self, params, tokens_BT, segment_ids_BT, positions_BT, last_B, prefix_BT=None,
                       prefix_embeds=None):
        """No cache: the whole fixed-length buffer (prompt, generated tokens, empty future slots
        marked as padding) through the model; the logits at each row's last real token."""
        logits = self.full_model.apply({"params": params}, tokens_BT, segment_ids_BT, positions_BT,
                                       prefix_BL=prefix_BT, prefix_embeds_BID=prefix_embeds)
        return jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0]

    def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, rng,
                 padding: str = "left", use_cache: bool = True, prefix_embeds=None):
        """Returns the generated token ids per prompt (without the prompt, cut after EOS).

        Prompts of different lengths are padded on the `padding` side. New tokens go to the slots
        after the padded prompt for every row; padding is masked and positions count real tokens
        only, so the result does not depend on the side. `use_cache=False` recomputes the whole
        sequence for every token (the reference the cache is tested and benchmarked against).

        `prefix_embeds` [n_prompts, I, D] (a vision-language model's image tokens) go before each
        prompt, at positions 0..I-1, and with the prompt form the bidirectional prefix of a
        prefix-LM attention kind; the prefill writes them into the cache."""
        n_prompts = len(prompts)
        # A sharded batch must divide over the batch axes: fill up with one-token rows, dropped.
        multiple = self._batch_multiple()
        prompts = list(prompts) + [self.filler] * (-n_prompts % multiple)
        tokens, segment_ids, positions, lengths = pad_prompts(prompts, padding, self.pad_id)
        B, P = tokens.shape
        I = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        prefix = None
        if I:
            prefix_embeds = jnp.pad(prefix_embeds, ((0, B - n_prompts), (0, 0), (0, 0)))
            segment_ids, positions = vlm.image_prefix_layout(I, segment_ids, positions)
            prefix = segment_ids != 0
        T = I + P + sampling.max_new_tokens
        last_slot = I + np.where(padding == "left", P - 1, lengths - 1).astype(np.int32)
        next_position = lengths + I
        timings = {"prefill_s": 0.0}
        start = time.perf_counter()
        if use_cache:
            cache = self.init_cache(B, T)
            params = self._run(self.decode_params, params)
            last_logits, cache = self._run(
                self.prefill, params, cache, *map(self._place, (tokens, segment_ids, positions, last_slot)),
                None if prefix is None else self._place(prefix), prefix_embeds,
            )
        else:
            buf_tokens = np.full((B, T - I), self.pad_id, np.int32)
            buf_segments = np.zeros((B, T), np.int32)
            buf_positions = np.zeros((B, T), np.int32)
            buf_prefix = None if prefix is None else np.zeros((B, T), bool)
            buf_tokens[:, :P] = tokens
            buf_segments[:, :I + P], buf_positions[:, :I + P] = segment_ids, positions
            if prefix is not None:
                buf_prefix[:, :I + P] = prefix
            last_logits = self._run(self.recompute_step, params, *map(
                self._place, (buf_tokens, buf_segments, buf_positions, last_slot)),
                None if prefix is None else self._place(buf_prefix), prefix_embeds)
        out = np.full((B, sampling.max_new_tokens), self.pad_id, np.int32)
        done = np.zeros(B, bool)
        done[n_prompts:] = True  # the filler rows
        tokens_B, done_B, rng = self._run(self.choose, sampling, last_logits, self._place(done), rng)
        positions_B = self._place(next_position)
        if use_cache:
            jax.block_until_ready(tokens_B)
            timings["prefill_s"] = time.perf_counter() - start
            start = time.perf_counter()
            out_BN, steps, _ = self._run(self.decode_loop, sampling, params, cache, tokens_B, positions_B, done_B, rng)
            out = np.asarray(out_BN)
            timings["decode_s"], timings["tokens_per_row"] = time.perf_counter() - start, int(steps)
            # One program runs every step, so each step's time is its share of the loop.
            timings["step_s"] = [timings["decode_s"] / max(int(steps) - 1, 1)] * (int(steps) - 1)
        else:
            timings["step_s"] = []
            for t in range(sampling.max_new_tokens):
                new_tokens = np.asarray(tokens_B)  # already padding where the row was done
                now = time.perf_counter()
                if t == 0:
                    timings["prefill_s"] = now - start
                else:
                    timings["step_s"].append(now - start)
                start = now
                out[:, t] = new_tokens
                if sampling.stop_at_eos:
                    done |= new_tokens == self.eos_id
                    if done.all():
                        break
                if t + 1 == sampling.max_new_tokens:
                    break
                slot = I + P + t
                buf_tokens[:, slot - I], buf_segments[:, slot], buf_positions[:, slot] = new_tokens, 1, next_position
                last_slot = np.full(B, slot, np.int32)
                last_logits = self._run(self.recompute_step, params, *map(
                    self._place, (buf_tokens, buf_segments, buf_positions, last_slot)),
                    None if prefix is None else self._place(buf_prefix), prefix_embeds)
                tokens_B, done_B, rng = self._run(self.choose, sampling, last_logits, done_B, rng)
                next_position = next_position + 1
        self.last_timings = timings
        results = []
        for row in out[:n_prompts]:
            row = list(row)
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            results.append([t for t in row[:end] if t != self.pad_id or t == self.eos_id])
        return results


def answer_images(cfg: Config, params, pixels, prompts: Sequence[str], sampling: SamplingConfig, rng,
                  mesh: jax.sharding.Mesh | None = None, use_cache: bool = True) -> list[list[int]]:
    """A vision-language model's ("vlm") generated token ids for each (image, prompt): the image
    tokens and the prompt prefilled into the KV cache, then one cached step per token. `pixels`:
    normalised images (images.normalise)."""
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    image_BID = jax.jit(vlm.embed_images, static_argnums=0)(cfg, params, pixels)
    ids = [tokenizer_lib.prompt_ids(tok, p) for p in prompts]
    return Generator(cfg.model, mesh).generate(params["language_model"], ids, sampling, rng,
                                               use_cache=use_cache, prefix_embeds=image_BID)


def sample_from_workdir(workdir: str, prompt: str, max_new_tokens: int = 200, seed: int = 0,
                        sampling: SamplingConfig | None = None) -> str:
    cfg, params = restore.load_params(workdir)
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    prompt_ids = tokenizer_lib.prompt_ids(tok, prompt)
    (generated,) = Generator(cfg.model).generate(params, [prompt_ids], sampling, jax.random.key(seed))
    return prompt + tok.decode(generated)
