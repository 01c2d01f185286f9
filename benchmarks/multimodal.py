"""Vision-language figures; prints JSON.

    python benchmarks/multimodal.py answers runs/vlm_digits runs/vlm_digits_blind
        exact-match accuracy of greedy answers (image and question prefilled into the KV cache)
        on every validation question of the run's image dataset, per question
    python benchmarks/multimodal.py speed [--steps 20] [--patch_size 2]
        train-step time of the fused model against the text-only decoder on the same number of
        tokens (image tokens + text), so the difference is the vision tower's share; and MFU

XLA:CPU unless a GPU is present. Results: benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

from jaxllm import config as C
from jaxllm import decoding, images, restore, sharding
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.training import flops, train


def answers(workdirs: list[str], batch_size: int = 64) -> dict:
    results = {}
    for workdir in workdirs:
        cfg, params = restore.load_params(workdir)
        tok = tokenizer_lib.load(cfg.model.tokenizer)
        examples = images.image_set(cfg.data, cfg.data.eval_split).examples
        blank = cfg.data.blank_images
        right, total = collections.Counter(), collections.Counter()
        sampling = decoding.SamplingConfig(max_new_tokens=12, temperature=0.0)
        start = time.perf_counter()
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo:lo + batch_size]
            pixels = np.stack([np.zeros((cfg.vision.image_size,) * 2 + (cfg.vision.channels,), np.uint8) if blank
                               else images.fit(e.image, cfg.vision, True, str(lo)) for e in chunk])
            out = decoding.answer_images(cfg, params, images.normalise(pixels, cfg.vision),
                                         [e.prompt for e in chunk], sampling, jax.random.key(0))
            for e, ids in zip(chunk, out):
                said = tok.decode([t for t in ids if t != tok.eos_id]).strip()
                total[e.prompt] += 1
                right[e.prompt] += said == e.answer
        results[workdir] = {
            "exact_match": sum(right.values()) / sum(total.values()),
            "per_question": {q: right[q] / total[q] for q in total},
            "questions": sum(total.values()), "seconds": round(time.perf_counter() - start, 1)}
    return results


def _step_time(cfg: C.Config, batch: dict, steps: int) -> tuple[float, float]:
    s = train.setup(cfg, sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1]))
    state = train.init_state(s, jax.random.key(0))
    step = train.make_train_step(s)
    placed = sharding.place_batch(batch, s.mesh)
    state, metrics = step(state, placed)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, placed)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def speed(steps: int, patch_size: int) -> dict:
    """The vlm_digits model (ViT + projector + decoder) against the decoder alone on rows as long
    as image tokens + text. Patch size 2 by default (16 image tokens): the experiment's own one-token
    tower is too small a share of the step to measure."""
    sys.path.insert(0, "experiments")
    import vlm_digits  # noqa: E402  (an experiment file, for its config)

    cfg = vlm_digits.get_config()
    cfg = dataclasses.replace(cfg, init_from="", checkpoint=C.CheckpointConfig(every=0),
                              vision=dataclasses.replace(cfg.vision, patch_size=patch_size))
    batch = images.batches(cfg, "train", "vlm").global_batch(0)
    I, (B, L) = cfg.vision.num_patches, batch["inputs"].shape
    text_cfg = dataclasses.replace(cfg, family="causal_lm", model=dataclasses.replace(cfg.model, attention_kind="causal"),
                                   train=dataclasses.replace(cfg.train, seq_len=I + L))
    rng = np.random.default_rng(0)
    text_batch = {"inputs": rng.integers(0, 256, (B, I + L)).astype(np.int32),
                  "targets": rng.integers(0, 256, (B, I + L)).astype(np.int32),
                  "segment_ids": np.ones((B, I + L), np.int32),
                  "positions": np.tile(np.arange(I + L, dtype=np.int32), (B, 1)),
                  "weights": np.ones((B, I + L), np.float32)}
    fused, fused_min = _step_time(cfg, batch, steps)
    text, text_min = _step_time(text_cfg, text_batch, steps)
    v = cfg.vision
    tower = C.ModelConfig(d_model=v.d_model, num_layers=v.num_layers, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
                          vocab_size=1)
    # Model FLOPs: decoder over I + L tokens, the tower over I tokens (its embedding table is empty),
    # the projector's matmuls; 6 per multiply-add of forward and backward.
    decoder_flops = flops.flops_per_token(cfg.model, I + L) * B * (I + L)
    tower_flops = flops.flops_per_token(tower, I) * B * I
    projector_flops = 6 * B * I * (v.d_model * cfg.model.d_model + cfg.model.d_model ** 2)
    peak = train.peak_flops_total() / jax.device_count()
    return {
        "backend": jax.default_backend(), "batch": B, "image_tokens": I, "text_tokens": L, "steps": steps,
        "fused_step_s": fused, "text_only_step_s": text, "fused_over_text_only": fused / text,
        "vision_share_of_step": 1 - text / fused,
        "fused_mfu": (decoder_flops + tower_flops + projector_flops) / fused / peak,
        "text_only_mfu": decoder_flops / text / peak,
        "fused_min_s": fused_min, "text_only_min_s": text_min,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("answers")
    a.add_argument("workdirs", nargs="+")
    sp = sub.add_parser("speed")
    sp.add_argument("--steps", type=int, default=20)
    sp.add_argument("--patch_size", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(answers(args.workdirs) if args.what == "answers" else speed(args.steps, args.patch_size), indent=2))


if __name__ == "__main__":
    main()
