"""The vision-language family: prefix-LM fusion, the loss on the answer only, cached generation with
an image prefix, sharding, frozen parts and resume; late fusion."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import decoding, images
from jaxllm.layers.attention import ATTENTION_KINDS, Tokens
from jaxllm.models import MODELS
from jaxllm.training import train

from helpers import save_fresh_run, tiny_config, two_train_steps

VISION = C.VisionConfig(image_size=8, patch_size=4, channels=1, d_model=32, num_layers=2, num_heads=2, mlp_dim=64)


def vlm_config(**overrides) -> C.Config:
    base = tiny_config()
    cfg = dataclasses.replace(
        base, family="vlm", vision=VISION, data=C.DataConfig(dataset="digits"),
        model=dataclasses.replace(base.model, attention_kind="prefix_lm"),
        train=dataclasses.replace(base.train, batch_size=8, seq_len=32))
    return dataclasses.replace(cfg, **overrides)


def late_fusion_config(**overrides) -> C.Config:
    cfg = dataclasses.replace(vlm_config(), family="late_fusion", classifier=C.ClassifierConfig(num_classes=2),
                              model=dataclasses.replace(tiny_config().model, attention_kind="causal"))
    return dataclasses.replace(cfg, **overrides)


def digits_batch(cfg: C.Config, step: int = 0) -> dict:
    layout = "vlm" if cfg.family == "vlm" else "late_fusion"
    return images.batches(cfg, "train", layout).global_batch(step)


def _init(cfg):
    family = MODELS.get(cfg.family)
    model = family.build(cfg)
    params = jax.jit(model.init)(jax.random.key(0), *family.init_inputs(cfg))["params"]
    return model, jax.device_get(jax.tree.map(lambda x: getattr(x, "value", x), params,
                                              is_leaf=lambda x: hasattr(x, "value")))


def _logits(model, params, batch):
    return model.apply({"params": params}, *(jnp.asarray(batch[k]) for k in
                                             ("images", "inputs", "segment_ids", "positions", "prefix")))


def test_prefix_lm_mask_truth_table():
    # Image (2 tokens) and prompt (1) form the prefix; the answer (2) is causal; the last slot pads.
    segment = jnp.array([[1, 1, 1, 1, 1, 0]])
    prefix = jnp.array([[1, 1, 1, 0, 0, 0]], bool)
    index = jnp.arange(6)[None]
    tokens = Tokens(segment, index, prefix)
    mask = np.asarray(ATTENTION_KINDS.get("prefix_lm").mask(tokens, tokens, None)[0]).astype(int)
    np.testing.assert_array_equal(mask, [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ])


def test_batches_put_the_loss_on_the_answer_and_the_prompt_in_the_prefix():
    cfg = vlm_config()
    batch = digits_batch(cfg)
    tok_bos = 257
    row = batch["inputs"][0]
    assert row[0] == tok_bos
    prompt_len = int(batch["prefix"][0].sum())
    text = bytes(int(t) for t in row[1:prompt_len]).decode()
    assert text in [q for q, _, _ in images.DIGIT_QUESTIONS]
    answer = bytes(int(t) for t, w in zip(batch["targets"][0], batch["weights"][0]) if w and t < 256).decode()
    assert answer in images.DIGIT_NAMES + images.YES_NO
    # Weights start where the last prompt token predicts the first answer token.
    assert batch["weights"][0, :prompt_len - 1].sum() == 0 and batch["weights"][0, prompt_len - 1] == 1
    # Deterministic: the same step gives the same batch.
    jax.tree.map(np.testing.assert_array_equal, digits_batch(cfg), batch)


def test_prefix_outputs_do_not_depend_on_the_answer_and_the_loss_ignores_the_prefix():
    cfg = vlm_config()
    model, params = _init(cfg)
    batch = digits_batch(cfg)
    changed = dict(batch, inputs=np.where(batch["prefix"] == 1, batch["inputs"], (batch["inputs"] + 7) % 256))
    a, b = _logits(model, params, batch), _logits(model, params, changed)
    in_prefix = batch["prefix"] == 1
    np.testing.assert_allclose(np.asarray(a)[in_prefix], np.asarray(b)[in_prefix], atol=1e-5)
    assert not np.allclose(np.asarray(a)[~in_prefix], np.asarray(b)[~in_prefix])
    loss = MODELS.get("vlm").loss_fn(model, cfg)
    other_targets = dict(batch, targets=np.where(batch["weights"] > 0, batch["targets"], 3))
    np.testing.assert_allclose(loss(params, batch)[0], loss(params, other_targets)[0], rtol=1e-6)
    # The image matters: another image changes the answer's logits.
    flipped = dict(batch, images=batch["images"][::-1])
    assert not np.allclose(np.asarray(a)[~in_prefix], np.asarray(_logits(model, params, flipped))[~in_prefix])


def test_cached_generation_with_an_image_prefix_equals_full_recompute():
    cfg = vlm_config()
    model, params = _init(cfg)
    batch = digits_batch(cfg)
    pixels = batch["images"][:3]
    prompts = ["what digit is this?", "is it even?", "?"]
    sampling = decoding.SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    cached = decoding.answer_images(cfg, params, pixels, prompts, sampling, jax.random.key(0))
    full = decoding.answer_images(cfg, params, pixels, prompts, sampling, jax.random.key(0), use_cache=False)
    assert cached == full and all(len(c) == 6 for c in cached)
    # The prefill's logits equal the fused model's at the prompt's last token.
    gen = decoding.Generator(cfg.model)
    ids = [257] + list(prompts[0].encode())
    image_BID = decoding.vlm.embed_images(cfg, params, pixels[:1])
    I = image_BID.shape[1]
    seg = np.ones((1, I + len(ids)), np.int32)
    pos = np.arange(I + len(ids), dtype=np.int32)[None]
    logits, _ = gen.prefill(gen.decode_params(params["language_model"]), gen.init_cache(1, I + len(ids) + 2),
                            np.array([ids], np.int32), seg, pos, np.array([I + len(ids) - 1], np.int32),
                            seg.astype(bool), image_BID)
    text = {"images": pixels[:1], "inputs": np.array([ids], np.int32), "segment_ids": seg[:, I:],
            "positions": np.arange(len(ids), dtype=np.int32)[None], "prefix": np.ones((1, len(ids)), np.int32)}
    np.testing.assert_allclose(logits, np.asarray(_logits(model, params, text))[:, -1], atol=2e-5)


def _two_steps(cfg, devices):
    _, state, history = two_train_steps(cfg, devices, batch=lambda k: digits_batch(cfg, k))
    return state, history


@pytest.mark.parametrize("make_config", [vlm_config, late_fusion_config], ids=["vlm", "late_fusion"])
def test_train_step_on_8_devices_equals_single_device(make_config):
    cfg = make_config(mesh=C.MeshConfig(data=2, fsdp=2, tensor=2))
    state, history = _two_steps(cfg, jax.devices())
    single_state, single = _two_steps(dataclasses.replace(cfg, mesh=C.MeshConfig(1, 1, 1, 1)), jax.devices()[:1])
    for got, want in zip(history, single):
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 jax.device_get(state.params), jax.device_get(single_state.params))
    assert history[1]["loss"] != history[0]["loss"]


def test_frozen_parts_get_no_updates():
    # LLaVA's stage 1: only the projector trains.
    cfg = vlm_config(opt=C.OptConfig(warmup_steps=1, freeze=(r"^vision/", r"^language_model/")))
    s = train.setup(cfg)
    before = jax.device_get(train.init_state(s, jax.random.key(0)).params)
    after, _ = _two_steps(cfg, jax.devices())
    after = jax.device_get(after.params)
    for part in ("vision", "language_model"):
        jax.tree.map(np.testing.assert_array_equal, after[part], before[part])
    assert not np.allclose(after["projector"]["kernel_in"] if "kernel_in" in after["projector"]
                           else after["projector"]["kernel"],
                           before["projector"]["kernel_in"] if "kernel_in" in before["projector"]
                           else before["projector"]["kernel"])
    with pytest.raises(C.ConfigError, match=r"opt.freeze: '\^vison/' matches no parameter"):
        train.setup(vlm_config(opt=C.OptConfig(freeze=(r"^vison/",))))


class _Interrupted(Exception):
    pass


def test_resuming_a_vlm_run_equals_the_uninterrupted_run(tmp_path):
    def run(name, stop_after=None):
        cfg = vlm_config(workdir=str(tmp_path / name), train=C.TrainConfig(
            steps=4, batch_size=8, seq_len=32, log_every=1, eval_every=4, eval_batches=2, progress_bar=False),
            checkpoint=C.CheckpointConfig(every=2, keep=2, async_save=False))
        records = []

        def log(record):
            if stop_after is not None and record.get("step", 0) > stop_after:
                raise _Interrupted  # after step 3's update, before its checkpoint: resume from step 2
            records.append(record)

        return train.train(cfg, log=log), records

    straight, straight_log = run("straight")
    with pytest.raises(_Interrupted):
        run("resumed", stop_after=2)
    resumed, resumed_log = run("resumed")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))
    assert [r["loss"] for r in resumed_log if "loss" in r] == [r["loss"] for r in straight_log if r.get("step", 0) > 2]
    assert 0.0 <= straight_log[-1]["eval_exact_match"] <= 1.0


def test_starting_from_a_causal_language_model_fills_the_language_model(tmp_path):
    lm_cfg = tiny_config(workdir=str(tmp_path / "lm"))
    state = save_fresh_run(lm_cfg, seed=7)
    # The causal LM starts a prefix-LM: the attention kind changes no params.
    cfg = vlm_config(init_from=lm_cfg.workdir)
    started, _ = train.restore_or_init(train.setup(cfg), None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.params["language_model"]),
                 jax.device_get(state.params))
    assert set(started.params) == {"vision", "projector", "language_model"}
