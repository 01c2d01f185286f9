"""Sampling with a KV cache: one prefill over the (left-padded) prompts, then one jitted decode step
per new token. Greedy, temperature, top-k and top-p; batched prompts of different lengths; each
sequence stops at EOS.

    python -m jaxllm.generate --workdir runs/tiny_lm --prompt "def "

Shape legend: B batch, P prompt length, S cache length, V vocab.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm.config import Config, ModelConfig
from jaxllm.model import Transformer
from jaxllm import data


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    stop_at_eos: bool = True


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = data.PAD_ID):
    """Left-pads token lists to one length: tokens [B, P], segment ids (0 on padding), positions
    counted from each prompt's first real token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS counts)")
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        segment_ids[i, P - len(p):] = 1
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return tokens, segment_ids, positions


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


class Generator:
    """Holds the jitted prefill and decode step for one model config; reuse across calls."""

    def __init__(self, model_cfg: ModelConfig):
        # Scanned or not, cache layout follows the params; decoding needs no remat.
        self.model_cfg = dataclasses.replace(model_cfg, remat="none")
        self.model = Transformer(self.model_cfg, decode=True)

    def init_cache(self, batch: int, length: int):
        tokens = jnp.zeros((batch, length), jnp.int32)
        shapes = jax.eval_shape(lambda: self.model.init(jax.random.key(0), tokens))["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    @functools.partial(jax.jit, static_argnums=0)
    def forward(self, params, cache, tokens_BL, segment_ids_BL, positions_BL):
        """Runs L tokens through the model, appending them to the cache; returns logits, cache."""
        logits, updated = self.model.apply(
            {"params": params, "cache": cache}, tokens_BL, segment_ids_BL, positions_BL,
            mutable=["cache"],
        )
        return logits, updated["cache"]

    def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, rng):
        """Returns the generated token ids per prompt (without the prompt, cut after EOS)."""
        tokens, segment_ids, positions = left_pad(prompts)
        B, P = tokens.shape
        cache = self.init_cache(B, P + sampling.max_new_tokens)
        logits, cache = self.forward(params, cache, tokens, segment_ids, positions)
        last_logits = logits[:, -1]
        next_position = positions[:, -1:] + 1
        ones = jnp.ones((B, 1), jnp.int32)
        out = np.full((B, sampling.max_new_tokens), data.PAD_ID, np.int32)
        done = np.zeros(B, bool)
        for t in range(sampling.max_new_tokens):
            rng, step_rng = jax.random.split(rng)
            new_tokens = np.asarray(choose_tokens(last_logits, step_rng, sampling))
            new_tokens = np.where(done, data.PAD_ID, new_tokens)
            out[:, t] = new_tokens
            if sampling.stop_at_eos:
                done |= new_tokens == data.EOS_ID
                if done.all():
                    break
            if t + 1 == sampling.max_new_tokens:
                break
            logits, cache = self.forward(params, cache, new_tokens[:, None], ones, next_position)
            last_logits = logits[:, -1]
            next_position = next_position + 1
        results = []
        for row in out:
            row = list(row)
            if data.EOS_ID in row:
                row = row[: row.index(data.EOS_ID) + 1]
            results.append([t for t in row if t != data.PAD_ID])
        return results


def load_params(workdir: str, mesh_cfg: config_lib.MeshConfig | None = None):
    """Restores only the params of the latest checkpoint in `workdir` onto a mesh of the local
    devices (fsdp over all of them unless `mesh_cfg` says otherwise). Returns (config, params)."""
    from jaxllm import checkpoint as ckpt
    from jaxllm import sharding, train

    cfg = config_lib.from_dict(Config, ckpt.read_config_json(workdir))
    mesh = sharding.make_mesh(mesh_cfg or config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1))
    s = train.setup(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=mesh.size)), mesh)
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), read_only=True)
    try:
        restored, _ = checkpointer.restore({"params": s.abstract_state.params}, partial=True)
    finally:
        checkpointer.close()
    return cfg, restored["params"]


def sample_from_workdir(workdir: str, prompt: str, max_new_tokens: int = 200, seed: int = 0,
                        sampling: SamplingConfig | None = None) -> str:
    cfg, params = load_params(workdir)
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    prompt_ids = [data.BOS_ID, *data.encode(prompt).tolist()]
    (generated,) = Generator(cfg.model).generate(params, [prompt_ids], sampling, jax.random.key(seed))
    return prompt + data.decode(generated)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a jaxllm checkpoint.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompts = args.prompt or [""]
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    try:
        cfg, params = load_params(args.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ids = [[data.BOS_ID, *data.encode(p).tolist()] for p in prompts]
    outputs = Generator(cfg.model).generate(params, ids, sampling, jax.random.key(args.seed))
    for prompt, generated in zip(prompts, outputs):
        print(prompt + data.decode(generated))
        if len(prompts) > 1:
            print("-" * 40)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
