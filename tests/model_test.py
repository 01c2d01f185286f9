import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm.models import transformer as model_lib
from jaxllm.decoding import Generator
from helpers import packed_batch, tiny_config, with_model


def _init(model_cfg, tokens):
    model = model_lib.Transformer(model_cfg)
    variables = model.init(jax.random.key(0), tokens)
    import flax.linen as nn
    return model, nn.meta.unbox(variables["params"])


def test_shapes_and_float32_logits():
    cfg = tiny_config().model
    batch = packed_batch()
    model, params = _init(cfg, batch["inputs"])
    logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
    assert logits.shape == (8, 32, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert params["blocks"]["attn"]["k"].shape == (cfg.num_layers, cfg.d_model, cfg.kv_heads, cfg.head_size)


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = tiny_config().model
    tokens = packed_batch()["inputs"][:2]
    model, params = _init(cfg, tokens)
    base = model.apply({"params": params}, tokens)
    changed = tokens.copy()
    changed[:, 20:] = (changed[:, 20:] + 7) % 259
    other = model.apply({"params": params}, changed)
    np.testing.assert_allclose(base[:, :20], other[:, :20], rtol=1e-6, atol=1e-6)
    assert not np.allclose(base[:, 20:], other[:, 20:])


def test_packed_documents_do_not_see_each_other():
    """A second document packed into a row gives the same logits as that document on its own."""
    cfg = tiny_config().model
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 259, 12), rng.integers(0, 259, 20)
    packed = np.concatenate([doc_a, doc_b])[None].astype(np.int32)
    segment_ids = np.array([[1] * 12 + [2] * 20], np.int32)
    positions = np.array([list(range(12)) + list(range(20))], np.int32)
    model, params = _init(cfg, packed)
    packed_logits = model.apply({"params": params}, packed, segment_ids, positions)
    alone = model.apply({"params": params}, doc_b[None].astype(np.int32))
    np.testing.assert_allclose(packed_logits[:, 12:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_scan_and_remat_give_same_logits_and_grads_as_unrolled(remat):
    cfg = tiny_config().model
    batch = packed_batch(batch_size=2)
    scanned = with_model(tiny_config(), scan_layers=True, remat=remat).model
    unrolled = with_model(tiny_config(), scan_layers=False, remat="none").model
    m_scan, p_scan = _init(scanned, batch["inputs"])
    m_loop, _ = _init(unrolled, batch["inputs"])
    # Same weights, laid out per block instead of stacked.
    p_loop = {k: v for k, v in p_scan.items() if k != "blocks"}
    for i in range(cfg.num_layers):
        p_loop[f"block_{i}"] = jax.tree.map(lambda x: x[i], p_scan["blocks"])

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, batch["inputs"], batch["segment_ids"], batch["positions"]) ** 2)

    l1, g1 = jax.value_and_grad(lambda p: loss(m_scan, p))(p_scan)
    l2, g2 = jax.value_and_grad(lambda p: loss(m_loop, p))(p_loop)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for i in range(cfg.num_layers):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-7),
                     g1["blocks"], g2[f"block_{i}"])


def test_grouped_query_attention_matches_repeated_kv_heads():
    """GQA with N kv heads equals MHA whose k/v weights repeat each kv head G times."""
    gqa_cfg = tiny_config().model  # 4 heads, 2 kv heads
    mha_cfg = with_model(tiny_config(), num_kv_heads=4).model
    tokens = packed_batch(batch_size=2)["inputs"]
    m_gqa, p_gqa = _init(gqa_cfg, tokens)
    m_mha, p_mha = _init(mha_cfg, tokens)
    p_mha = jax.tree.map(lambda x: x, p_gqa)
    for name in ("k", "v"):
        p_mha["blocks"]["attn"][name] = jnp.repeat(p_gqa["blocks"]["attn"][name], 2, axis=2)
    np.testing.assert_allclose(
        m_gqa.apply({"params": p_gqa}, tokens), m_mha.apply({"params": p_mha}, tokens), rtol=1e-5, atol=1e-6
    )


def test_untied_output_projection_and_bfloat16_compute():
    cfg = with_model(tiny_config(), tie_embeddings=False, dtype="bfloat16").model
    tokens = packed_batch(batch_size=2)["inputs"]
    model, params = _init(cfg, tokens)
    assert "unembed" in params and params["unembed"].dtype == jnp.float32
    logits = model.apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


# Recipes other than Llama's (ModelConfig's recipe fields): Gemma-3-like (local:global attention
# pattern with its own RoPE bases, sandwich norms with 1 + w, q/k norms, GeGLU, scaled embeddings,
# soft-caps) and GPT-2-like (LayerNorm, learned positions, gelu with biases) and BERT-like
# post-norm blocks.
RECIPES = {
    "gemma_like": dict(attention_pattern=("sliding_window", "sliding_window", "causal"), window=3,
                       rope_thetas=(10_000.0, 10_000.0, 1e6), num_layers=3, norm_kind="rmsnorm_plus_one",
                       norm_placement="sandwich", qk_norm=True, mlp_kind="geglu", embed_scale=8.0,
                       query_scale=0.3, attn_logit_softcap=2.0, final_logit_softcap=5.0),
    "gpt2_like": dict(norm_kind="layernorm", position_kind="learned", max_positions=64, mlp_kind="gelu_tanh",
                      mlp_bias=True, qkv_bias=True, attn_out_bias=True),
    "bert_like": dict(norm_kind="layernorm", norm_placement="post", embed_norm=True, position_kind="learned",
                      max_positions=64, mlp_kind="gelu", mlp_bias=True, scan_layers=False),
}


def _perturbed(params, seed=7):
    """Zero-initialised norms and biases made random, so that a dropped one changes the logits."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_scanned_equal_unscanned_and_every_part_counts(recipe):
    """Each recipe's scanned stack (groups of the attention pattern's period) gives the unscanned
    stack's logits with the same weights; and the recipe is not a no-op: the Llama recipe with the
    same weights (where they fit) differs."""
    cfg = with_model(tiny_config(), **{**RECIPES[recipe], "scan_layers": True}).model
    tokens = packed_batch(batch_size=2)["inputs"]
    model, params = _init(cfg, tokens)
    params = _perturbed(params)
    from jaxllm.decoding import unstack_layers
    unscanned = dataclasses.replace(cfg, scan_layers=False)
    logits = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(model_lib.Transformer(unscanned).apply({"params": unstack_layers(cfg, params)}, tokens),
                               logits, rtol=1e-5, atol=1e-5)
    for field, value in RECIPES[recipe].items():  # each field on its own changes the logits
        if field in ("num_layers", "attention_pattern", "max_positions", "scan_layers", "position_kind", "qk_norm", "mlp_bias",
                     "qkv_bias", "attn_out_bias", "embed_norm") or value in ("layernorm", "post", "gelu", "gelu_tanh"):
            continue  # Llama's value needs other params (the parity tests cover these)
        plain = dataclasses.replace(cfg, **{field: getattr(C.ModelConfig(), field)})
        other = model_lib.Transformer(plain).apply({"params": params}, tokens)
        assert not np.allclose(other, logits, atol=1e-3), field


@pytest.mark.parametrize("scan_layers,moe,recipe", [(True, False, ""), (False, False, ""), (True, True, ""),
                                                    (True, False, "gemma_like"), (False, False, "gpt2_like")],
                         ids=["scanned", "unscanned", "moe", "gemma_like", "gpt2_like"])
def test_cached_decoding_equals_full_recompute(scan_layers, moe, recipe):
    """Prefill a left-padded batch, then decode token by token: every step's logits equal the logits
    of running the whole sequence so far without a cache. (The MoE case is dropless: with capacity
    dispatch, which copies overflow depends on the whole sequence, so no causal cache can match.)"""
    cfg = with_model(tiny_config(), **RECIPES.get(recipe, {}), scan_layers=scan_layers).model
    if moe:
        cfg = dataclasses.replace(cfg, moe=C.MoeConfig(num_experts=4, top_k=2, every=2, num_shared=1))
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 259, 5)), list(rng.integers(0, 259, 9))]
    continuation = rng.integers(0, 259, (2, 6)).astype(np.int32)
    _, params = _init(cfg, np.zeros((1, 8), np.int32))
    if recipe:
        params = _perturbed(params)
    gen = Generator(cfg)
    from jaxllm.decoding import left_pad
    tokens, segs, pos = left_pad(prompts)
    cache = gen.init_cache(2, tokens.shape[1] + continuation.shape[1])
    logits, cache = gen.forward(params, cache, tokens, segs, pos)
    cached = [logits[:, -1]]
    next_pos = pos[:, -1:] + 1
    for t in range(continuation.shape[1]):
        logits, cache = gen.forward(params, cache, continuation[:, t:t + 1], np.ones((2, 1), np.int32), next_pos)
        cached.append(logits[:, -1])
        next_pos = next_pos + 1
    # By causality, position t of one full forward pass is the recomputed next-token logits of
    # the prefix ending at t.
    full_model = model_lib.Transformer(cfg)
    for i, prompt in enumerate(prompts):
        seq = np.array([prompt + list(continuation[i])], np.int32)
        full = full_model.apply({"params": params}, seq)[0]
        for t in range(continuation.shape[1] + 1):
            np.testing.assert_allclose(cached[t][i], full[len(prompt) - 1 + t], rtol=1e-4, atol=1e-4)


def test_unknown_mlp_kind_is_a_clear_error():
    cfg = with_model(tiny_config(), mlp_kind="nope").model
    with pytest.raises(ValueError, match="registered"):
        _init(cfg, np.zeros((1, 4), np.int32))


def test_registering_a_new_mlp_kind_is_one_table_entry():
    import flax.linen as nn

    class Identity(nn.Module):
        cfg: object

        @nn.compact
        def __call__(self, x, valid=None):
            return 0 * x

    model_lib.MLP_KINDS["zero_test"] = Identity
    try:
        cfg = with_model(tiny_config(), mlp_kind="zero_test").model
        _, params = _init(cfg, np.zeros((1, 4), np.int32))
        assert "mlp" not in params["blocks"]
    finally:
        del model_lib.MLP_KINDS["zero_test"]
