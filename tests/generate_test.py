import dataclasses

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import data, decoding, restore
from jaxllm.training import train
from jaxllm.models import Transformer
from helpers import tiny_config, with_model


def test_left_pad_positions_and_segments():
    tokens, segs, pos = decoding.left_pad([[5, 6, 7], [9]])
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [data.PAD_ID, data.PAD_ID, 9]])
    np.testing.assert_array_equal(segs, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 0, 0]])


def test_top_k_and_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    top2 = decoding.filter_logits(logits, 1.0, 2, 1.0)
    assert np.isfinite(top2[0, :2]).all() and np.isinf(top2[0, 2:]).all()
    nucleus = decoding.filter_logits(logits, 1.0, 0, 0.7)  # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(nucleus[0, :2]).all() and np.isinf(nucleus[0, 2:]).all()
    tiny_p = decoding.filter_logits(logits, 1.0, 0, 0.01)  # always keeps the top token
    assert np.isfinite(tiny_p[0, 0]) and np.isinf(tiny_p[0, 1:]).all()


def test_sampling_draws_only_from_the_kept_tokens():
    logits = jnp.tile(jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]])), (512, 1))
    tokens = decoding.choose_tokens(logits, jax.random.key(0), decoding.SamplingConfig(temperature=1.0, top_k=2))
    assert set(np.unique(tokens)) == {0, 1}
    greedy = decoding.choose_tokens(logits, jax.random.key(0), decoding.SamplingConfig(temperature=0.0))
    assert (np.asarray(greedy) == 0).all()


def test_batched_greedy_generation_equals_unbatched_and_full_recompute():
    cfg = tiny_config().model
    import flax.linen as nn
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    gen = decoding.Generator(cfg)
    greedy = decoding.SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    prompts = [[data.BOS_ID, 10, 11, 12, 13], [data.BOS_ID, 40]]
    batched = gen.generate(params, prompts, greedy, jax.random.key(0))
    for prompt, out in zip(prompts, batched):
        assert gen.generate(params, [prompt], greedy, jax.random.key(0))[0] == out
        # Greedy decoding by full recompute, one token at a time, over a fixed-length buffer (one
        # compilation; the causal mask keeps the unfilled slots out of the logits read).
        seq = list(prompt)
        full_logits = jax.jit(lambda tokens: Transformer(cfg).apply({"params": params}, tokens))
        for _ in range(6):
            buffer = np.full((1, len(prompt) + 6), data.PAD_ID, np.int32)
            buffer[0, : len(seq)] = seq
            seq.append(int(jnp.argmax(full_logits(buffer)[0, len(seq) - 1])))
        assert seq[len(prompt):] == out


def test_generation_stops_at_eos_per_sequence(monkeypatch):
    """Row 0 emits EOS at its 2nd token, row 1 at its 4th: each output ends at its EOS and the
    loop stops once every row is done."""
    cfg = tiny_config().model
    import flax.linen as nn
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    scripted = iter([[7, 7], [data.EOS_ID, 8], [9, 9], [10, data.EOS_ID], [11, 11]])
    # The sampler runs inside the jitted decode program: script it with a host callback, which
    # runs once per generated token.
    scripted_tokens = lambda *_: io_callback(
        lambda: np.asarray(next(scripted), np.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    monkeypatch.setattr(decoding, "choose_tokens", scripted_tokens)
    gen = decoding.Generator(cfg)
    out = gen.generate(params, [[data.BOS_ID, 1], [data.BOS_ID, 2, 3]],
                       decoding.SamplingConfig(max_new_tokens=10), jax.random.key(0))
    assert out == [[7, data.EOS_ID], [7, 8, 9, data.EOS_ID]]
    assert next(scripted) == [11, 11]  # nothing sampled after both rows finished


def test_right_pad_positions_and_segments():
    tokens, segs, pos, lengths = decoding.pad_prompts([[5, 6, 7], [9]], "right")
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [9, data.PAD_ID, data.PAD_ID]])
    np.testing.assert_array_equal(segs, [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(pos[1, :1], [0])
    np.testing.assert_array_equal(lengths, [3, 1])
    with pytest.raises(ValueError, match="padding side"):
        decoding.pad_prompts([[1]], "middle")


def _tiny_params(cfg):
    import flax.linen as nn
    return nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("moe_every", [0, 1, 2], ids=["dense", "all_moe", "moe_every_2"])
def test_unstack_layers_gives_the_unscanned_model_the_scanned_ones_weights(moe_every):
    """The decoding model runs unscanned on converted scanned params: same tree as an unscanned
    init, same logits as the scanned model (4 blocks; with MoE every 2nd, two scanned groups)."""
    from jaxllm import config as C

    cfg = with_model(tiny_config(), num_layers=4).model
    if moe_every:
        cfg = dataclasses.replace(cfg, moe=C.MoeConfig(num_experts=4, top_k=2, every=moe_every, num_shared=1))
    unscanned_cfg = dataclasses.replace(cfg, scan_layers=False)
    params = _tiny_params(cfg)
    converted = decoding.unstack_layers(cfg, params)
    expected = jax.eval_shape(lambda: _tiny_params(unscanned_cfg))
    assert jax.tree.structure(converted) == jax.tree.structure(expected)
    assert jax.tree.map(jnp.shape, converted) == jax.tree.map(lambda a: a.shape, expected)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
    np.testing.assert_allclose(Transformer(unscanned_cfg).apply({"params": converted}, tokens),
                               Transformer(cfg).apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)
    assert decoding.unstack_layers(unscanned_cfg, converted) is converted


@pytest.mark.parametrize("kernels", ["float", "bfloat16_compute", "int8", "moe_every_2"])
def test_decoding_params_in_the_compute_dtype_give_the_same_logits(kernels):
    """decode_params casts the attention's and MLP's float kernels to the compute dtype once
    (int8 ones and the MoE blocks' expert kernels stay as they are): the decoding model's prefill
    logits equal, bit for bit, those from the float32 kernels, which it casts per call."""
    from jaxllm import config as C
    from jaxllm.compression import quantize

    cfg = with_model(tiny_config(), num_layers=2).model
    if kernels == "moe_every_2":
        cfg = dataclasses.replace(cfg, moe=C.MoeConfig(num_experts=4, top_k=2, every=2, num_shared=1))
    if kernels in ("bfloat16_compute", "moe_every_2"):
        cfg = dataclasses.replace(cfg, dtype="bfloat16")
    params = _tiny_params(cfg)
    if kernels == "int8":
        params = quantize.quantize_params(params)
    gen = decoding.Generator(cfg)
    as_trained = decoding.unstack_layers(cfg, params)
    narrowed = gen.decode_params(params)
    attn, mlp = narrowed["block_0"]["attn"], narrowed["block_0"]["mlp"]
    want = jnp.dtype(jnp.float32 if kernels in ("float", "int8") else jnp.bfloat16)
    if kernels == "int8":
        assert attn["q"].keys() == as_trained["block_0"]["attn"]["q"].keys()
    else:
        assert {attn[n].dtype for n in "qkvo"} | {mlp[n].dtype for n in ("gate", "up", "down")} == {want}
        assert as_trained["block_0"]["attn"]["o"].dtype == jnp.float32
    assert narrowed["block_0"]["attn_norm"]["scale"].dtype == jnp.float32
    if kernels == "moe_every_2":
        assert narrowed["block_1"]["mlp"]["gate"].dtype == jnp.float32  # expert kernels [E, D, F]
    tokens, segment_ids, positions, _ = decoding.pad_prompts([[data.BOS_ID, 10, 11, 12, 13], [data.BOS_ID, 40]])
    last = np.array([4, 4], np.int32)
    got, _ = gen.prefill(narrowed, gen.init_cache(2, 8), tokens, segment_ids, positions, last)
    expected, _ = gen.prefill(as_trained, gen.init_cache(2, 8), tokens, segment_ids, positions, last)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


PADDED_PROMPTS = [[data.BOS_ID, 10, 11, 12, 13, 14, 15], [data.BOS_ID, 40], [data.BOS_ID, 7, 8, 9]]


def test_cached_decoding_equals_full_recompute_for_padded_batches():
    """For left- and right-padded batches, greedy tokens with the KV cache equal those of
    recomputing the padded buffer for every token, and those of each prompt alone without
    padding; sampled tokens (same rng), which depend on all the logits, agree too."""
    cfg = tiny_config().model
    params = _tiny_params(cfg)
    gen = decoding.Generator(cfg)
    greedy = decoding.SamplingConfig(max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    sampled = dataclasses.replace(greedy, temperature=1.0)
    alone = [gen.generate(params, [p], greedy, jax.random.key(0), use_cache=False)[0] for p in PADDED_PROMPTS]
    assert all(len(out) == 5 for out in alone)
    for padding in ("left", "right"):
        for sampling, reference in ((greedy, alone), (sampled, None)):
            cached = gen.generate(params, PADDED_PROMPTS, sampling, jax.random.key(3), padding=padding)
            recomputed = gen.generate(params, PADDED_PROMPTS, sampling, jax.random.key(3),
                                      padding=padding, use_cache=False)
            assert cached == recomputed, (padding, sampling.temperature)
            if reference is not None:
                assert cached == reference, padding


@pytest.mark.parametrize("quantized", [False, True])
def test_sharded_decoding_equals_single_device(quantized):
    """Batch over data x fsdp, heads over tensor (3 prompts fill a 4-row sharded batch): the
    same tokens and prompt logits as on one device, with the cache split the same way."""
    from jaxllm import config as C, sharding
    from jaxllm.compression import quantize

    cfg = tiny_config(mesh=C.MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    params = _tiny_params(cfg.model)
    if quantized:
        params = quantize.quantize_params(params)
    s = train.setup(cfg)
    shardings = s.state_shardings.params
    if quantized:
        shardings = jax.tree.map(lambda a: a.sharding, quantize.quantized_abstract(s.abstract_state.params))
    sharded_params = jax.device_put(params, shardings)
    single, sharded = decoding.Generator(cfg.model), decoding.Generator(cfg.model, s.mesh)
    greedy = decoding.SamplingConfig(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    for padding in ("left", "right"):
        expected = single.generate(params, PADDED_PROMPTS, greedy, jax.random.key(0), padding=padding)
        assert sharded.generate(sharded_params, PADDED_PROMPTS, greedy, jax.random.key(0),
                                padding=padding) == expected

    tokens, segs, pos, lengths = decoding.pad_prompts(PADDED_PROMPTS + [[data.BOS_ID]])
    last = np.full(4, tokens.shape[1] - 1, np.int32)
    logits_1, _ = single.prefill(params, single.init_cache(4, 12), tokens, segs, pos, last)
    with sharding.activate(s.mesh):
        logits_8, cache = sharded.prefill(sharded_params, sharded.init_cache(4, 12),
                                          *map(sharded._place, (tokens, segs, pos, last)))
    np.testing.assert_allclose(np.asarray(logits_8), np.asarray(logits_1), rtol=1e-5, atol=1e-5)
    for i in range(cfg.model.num_layers):
        # [B·N, S, K], rows (batch, KV head) pairs: split like B over 4 shards and N over 2.
        key = cache[f"block_{i}"]["attn"]["key"]
        rows, S, K = key.shape
        assert key.sharding.shard_shape(key.shape) == (rows // 8, S, K)


def test_a_run_trained_with_cudnn_attention_loads_and_samples_off_gpu(tmp_path):
    """cuDNN attention is a computation choice, not part of the model: on CPU the loaded config
    switches to the XLA attention, so both the cached path and the full forward (which would
    otherwise call cuDNN) run."""
    import json

    from jaxllm import config as C

    workdir = str(tmp_path / "run")
    cfg = tiny_config(workdir=workdir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1, eval_every=100),
                              checkpoint=C.CheckpointConfig(every=1, async_save=False))
    train.train(cfg, log=lambda record: None)
    with open(f"{workdir}/config.json") as f:
        saved = json.load(f)
    saved["model"].update(attention_impl="cudnn", dtype="bfloat16")  # as a GPU run writes it
    with open(f"{workdir}/config.json", "w") as f:
        json.dump(saved, f)

    loaded_cfg, params = restore.load_params(workdir)
    assert loaded_cfg.model.attention_impl == "xla" and loaded_cfg.model.dtype == "bfloat16"
    gen = decoding.Generator(loaded_cfg.model)
    sampling = decoding.SamplingConfig(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    prompt = [[data.BOS_ID, *data.encode("def ").tolist()]]
    (generated,) = gen.generate(params, prompt, sampling, jax.random.key(0))
    assert len(generated) == 4
    # The cached prefill through the XLA attention computes the full forward's last logits
    # (both bfloat16, hence the tolerance).
    tokens, segs, pos, _ = decoding.pad_prompts(prompt)
    last = np.array([tokens.shape[1] - 1], np.int32)
    cached_logits, _ = gen.prefill(params, gen.init_cache(1, tokens.shape[1]), tokens, segs, pos, last)
    full_logits = Transformer(loaded_cfg.model).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(cached_logits, np.float32).reshape(-1),
                               np.asarray(full_logits[0, -1], np.float32), rtol=0.02, atol=0.02)
