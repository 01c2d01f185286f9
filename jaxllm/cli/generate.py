"""Sample from a run directory's checkpoint (float or int8), optionally sharded over devices; a
vision-language run answers about an image.

    python -m jaxllm.generate --workdir runs/tiny_lm --prompt "def "
    python -m jaxllm.generate --workdir runs/vlm_digits --image digit.png --prompt "what digit is this?"
    python -m jaxllm.generate --workdir runs/distill_tiny_teacher --draft runs/distill_tiny --gamma 4 --prompt "def "
    python -m jaxllm.generate --workdir runs/tiny_lm --prompts_file prompts.txt --slots 8

A prompts file holds one prompt per line; a line starting with a double quote is a JSON string
(for prompts with newlines). Its prompts are decoded by continuous batching (jaxllm/batching.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

import jax

import numpy as np

from jaxllm import images, restore
from jaxllm.batching import ContinuousBatcher
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import ConfigError
from jaxllm.decoding import PADDING_SIDES, Generator, SamplingConfig, answer_images
from jaxllm.models import MODELS
from jaxllm.speculative import SpeculativeGenerator, check_draft


def decode_layout(gen: Generator, params):
    """`params` in `gen`'s decoding layout (`Generator.decode_params`), made once so that the loaded
    layout can be freed: a run trained in float32 that computes in bfloat16 decodes from bfloat16
    kernels, half their memory."""
    return gen._run(gen.decode_params, params)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a jaxllm checkpoint.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    parser.add_argument("--image", action="append",
                        help="an image file per prompt (vision-language runs); one image serves every prompt")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padding", choices=PADDING_SIDES, default="left")
    parser.add_argument("--tensor", type=int, default=1,
                        help="shard heads and MLP over this many devices (batch over the rest)")
    parser.add_argument("--draft", help="run directory of a draft model sharing the vocabulary: speculative decoding")
    parser.add_argument("--gamma", type=int, default=4, help="tokens the draft proposes per round (with --draft)")
    parser.add_argument("--kv_cache_dtype", choices=("auto", "float32", "bfloat16", "int8"),
                        help="storage of the KV cache (default: the run's model.kv_cache_dtype)")
    parser.add_argument("--prompts_file", help="one prompt per line, decoded by continuous batching")
    parser.add_argument("--slots", type=int, default=8, help="rows decoded together (with --prompts_file)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max_new_tokens {args.max_new_tokens} must be 0 or more")
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature} must be 0 (greedy) or positive")
    if args.top_k < 0:
        parser.error(f"--top_k {args.top_k} must be 0 (off) or positive")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p {args.top_p} must be in (0, 1]")
    if args.tensor < 1:
        parser.error(f"--tensor {args.tensor} must be 1 or more")
    if args.gamma < 1:
        parser.error(f"--gamma {args.gamma} must be 1 or more")
    if args.prompts_file and (args.prompt or args.image or args.draft):
        parser.error("give --prompts_file or --prompt (with --image or --draft), not both")
    prompts = args.prompt or [""]
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts = [json.loads(line) if line.startswith('"') else line
                           for line in f.read().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--prompts_file {args.prompts_file}: {e}")
        if not prompts:
            parser.error(f"--prompts_file {args.prompts_file} holds no prompt")
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    try:
        cfg, params = restore.load_params(args.workdir, tensor=args.tensor)
        if args.kv_cache_dtype:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kv_cache_dtype=args.kv_cache_dtype))
        if args.draft:
            draft_cfg, draft_params = restore.load_params(args.draft, tensor=args.tensor)
            check_draft(cfg.model, draft_cfg.model, f"--draft {args.draft}")
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.top_k > cfg.model.vocab_size:
        parser.error(f"--top_k {args.top_k} is larger than the vocabulary ({cfg.model.vocab_size})")
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    try:
        if not MODELS.get(cfg.family).generates and cfg.family != "vlm":
            raise ConfigError(f"{args.workdir} is a {cfg.family} run, which does not generate text; "
                              "sample from a causal_lm or vlm run")
        if MODELS.get(cfg.family).images != bool(args.image):
            raise ConfigError(f"{args.workdir} is a {cfg.family} run: " + (
                "give it --image FILE" if not args.image else "it reads no images; drop --image"))
        if args.image and args.draft:
            raise ConfigError("--draft decodes text prompts only; drop --image or --draft")
        if args.image:
            files = args.image * len(prompts) if len(args.image) == 1 else args.image
            if len(files) != len(prompts):
                raise ConfigError(f"{len(files)} --image for {len(prompts)} --prompt: give one image, or one per prompt")
            pixels = images.normalise(np.stack([images.load_image(f, cfg.vision) for f in files]), cfg.vision)
            outputs = answer_images(cfg, params, pixels, prompts, sampling, jax.random.key(args.seed), mesh)
        elif args.prompts_file:
            ids = [tokenizer_lib.prompt_ids(tok, p) for p in prompts]
            batcher = ContinuousBatcher(cfg.model, args.slots, mesh=mesh)
            params = decode_layout(batcher.gen, params)
            outputs = batcher.generate(params, ids, sampling, jax.random.key(args.seed))
            stats = batcher.last_stats
            print(f"continuous batching: {len(ids)} prompts in {batcher.slots} slots, "
                  f"{stats['generated_tokens']} tokens in {stats['seconds']:.2f} s (compilation included), "
                  f"{stats['decode_steps']} decode steps in {stats['decode_calls']} calls, "
                  f"{stats['prefill_calls']} prefill calls", file=sys.stderr)
        elif args.draft:
            ids = [tokenizer_lib.prompt_ids(tok, p) for p in prompts]
            spec = SpeculativeGenerator(cfg.model, draft_cfg.model, args.gamma, mesh)
            params, draft_params = decode_layout(spec.target, params), decode_layout(spec.draft, draft_params)
            outputs = spec.generate(params, draft_params, ids, sampling, jax.random.key(args.seed))
            stats = spec.last_stats
            print(f"speculative decoding: acceptance rate {stats['acceptance_rate']:.3f} "
                  f"({stats['accepted']}/{stats['drafted']} drafted tokens), "
                  f"{stats['tokens_per_round']:.2f} tokens per round", file=sys.stderr)
        else:
            ids = [tokenizer_lib.prompt_ids(tok, p) for p in prompts]
            gen = Generator(cfg.model, mesh)
            params = decode_layout(gen, params)
            outputs = gen.generate(params, ids, sampling, jax.random.key(args.seed), padding=args.padding)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for prompt, generated in zip(prompts, outputs):
        print(prompt + tok.decode(generated))
        if len(prompts) > 1:
            print("-" * 40)


if __name__ == "__main__":
    main()
