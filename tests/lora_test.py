"""LoRA (compression/lora.py) and the fine-tuning modes (training/finetune.py) on a causal LM: a
fresh adapter changes nothing, merged kernels are W + s·A·B on the right axes, the unmerged path
(x W + s·(dropout(x) A) B inside the layers) equals the merged one without dropout, dropout changes
training but not evaluation, only adapters train (the frozen base and its absence from the
optimizer state), sharded equals single device, and a LoRA run loads merged through the one
restore path."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import restore, sharding
from jaxllm.compression import lora
from jaxllm.models import Transformer
from jaxllm.ops import grouped_ffn
from jaxllm.ops.projection import Adapted
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train
from helpers import packed_batch, tiny_config, with_model

LORA = C.LoraConfig(rank=4, alpha=8.0, targets=(r"(^|/)attn/(q|k|v|o)$", r"(^|/)mlp/(gate|up|down)$"))


def _boxed(model_cfg):
    return jax.eval_shape(lambda: Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _params(model_cfg):
    return nn.meta.unbox(Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_is_w_plus_s_a_b():
    cfg = with_model(tiny_config(), moe=C.MoeConfig(num_experts=4, top_k=2)).model
    params = _params(cfg)
    adapters = nn.meta.unbox(lora.init_adapters(jax.random.key(1), _boxed(cfg), LORA))
    assert set(adapters) == {f"blocks/attn/{p}" for p in "qkvo"} | {f"blocks/mlp/{p}" for p in ("gate", "up", "down")}
    merged = lora.merge(params, adapters, LORA)
    jax.tree.map(np.testing.assert_array_equal, merged, params)  # B = 0
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), adapters)
    merged = lora.merge(params, trained, LORA)
    scale = LORA.alpha / LORA.rank
    # o [layers, H, K, D]: inputs (H, K), output D.
    a, b = trained["blocks/attn/o"]["a"], trained["blocks/attn/o"]["b"]  # [layers, H, K, r], [layers, r, D]
    want = params["blocks"]["attn"]["o"] + scale * jnp.einsum("lhkr,lrd->lhkd", a, b)
    np.testing.assert_allclose(merged["blocks"]["attn"]["o"], want, rtol=1e-5, atol=1e-5)
    # Experts [layers, E, D, F]: one adapter per layer and expert.
    a, b = trained["blocks/mlp/gate"]["a"], trained["blocks/mlp/gate"]["b"]  # [l, E, D, r], [l, E, r, F]
    want = params["blocks"]["mlp"]["gate"] + scale * jnp.einsum("ledr,lerf->ledf", a, b)
    np.testing.assert_allclose(merged["blocks"]["mlp"]["gate"], want, rtol=1e-5, atol=1e-5)
    # Merged weights give the unmerged computation: x W + s (x A) B, for q [layers, D, H, K].
    x = jnp.asarray(rng.standard_normal((3, cfg.d_model)), jnp.float32)
    a, b = trained["blocks/attn/q"]["a"], trained["blocks/attn/q"]["b"]
    unmerged = jnp.einsum("td,dhk->thk", x, params["blocks"]["attn"]["q"][0]) + scale * jnp.einsum(
        "tr,rhk->thk", x @ a[0], b[0])
    np.testing.assert_allclose(jnp.einsum("td,dhk->thk", x, merged["blocks"]["attn"]["q"][0]), unmerged,
                               rtol=1e-4, atol=1e-4)


def test_unmerged_adapters_equal_merged_ones_dense_and_moe_experts():
    """Dense blocks and MoE blocks (every=2: a scanned group of both; dropless dispatch here,
    capacity in the dropout test); an adapter the layers cannot apply unmerged (the embedding) is
    merged. Outputs and the adapters' gradients agree, and a fresh adapter changes nothing."""
    lora_cfg = dataclasses.replace(LORA, targets=LORA.targets + (r"embed/embedding$",))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
    cfg = with_model(tiny_config(), moe=C.MoeConfig(num_experts=4, top_k=2, every=2, dispatch="dropless")).model
    model = Transformer(cfg)
    params = _params(cfg)
    adapters = nn.meta.unbox(lora.init_adapters(jax.random.key(1), _boxed(cfg), lora_cfg))
    adapted = lora.adapt(params, adapters, lora_cfg)
    assert isinstance(adapted["blocks"]["block_1"]["mlp"]["gate"], Adapted)  # the experts'
    assert not isinstance(adapted["embed"]["embedding"], Adapted)  # merged

    def logits(a, merge):
        out = model.apply({"params": (lora.merge if merge else lora.adapt)(params, a, lora_cfg)}, tokens)
        return jnp.sum(out ** 2), out

    run = jax.jit(jax.grad(logits, has_aux=True), static_argnums=1)  # (adapters' gradients, logits)
    # B = 0: the merged params are the base params exactly.
    np.testing.assert_allclose(run(adapters, False)[1], run(adapters, True)[1], rtol=1e-6, atol=1e-6)
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), adapters)
    (grads, got), (want_grads, want) = run(trained, False), run(trained, True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()),
                 grads, want_grads)


@pytest.mark.parametrize("kind", ["blocked", "ragged_dot", "dense"])
def test_every_grouped_ffn_applies_expert_adapters_like_merged_kernels(kind):
    """The expert FFN implementations (blocked on CPU, ragged_dot on accelerators, dense) with
    adapted expert kernels equal the same FFN on the merged kernels."""
    E, D, F, R, r = 4, 8, 16, 24, 2
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    x_RD, group_R = normal(R, D), jnp.asarray(np.sort(rng.integers(0, E, R)), jnp.int32)
    kernels = (normal(E, D, F), normal(E, D, F), normal(E, F, D))
    adapters = [(normal(E, D, r), normal(E, r, F)), (normal(E, D, r), normal(E, r, F)), (normal(E, F, r), normal(E, r, D))]
    scale = 0.5
    adapted = [Adapted(w, a, b, scale=scale) for w, (a, b) in zip(kernels, adapters)]
    merged = [w + scale * jnp.einsum("eir,ero->eio", a, b) for w, (a, b) in zip(kernels, adapters)]
    ffn = grouped_ffn.grouped_swiglu(kind)
    np.testing.assert_allclose(ffn(x_RD, group_R, *adapted), ffn(x_RD, group_R, *merged), rtol=1e-5, atol=1e-5)


def test_dropout_on_an_adapter_that_is_merged_is_a_clear_error():
    cfg = tiny_config().model
    with_embedding = dataclasses.replace(LORA, dropout=0.1, targets=LORA.targets + (r"embed/embedding$",))
    with pytest.raises(C.ConfigError, match="embed/embedding is merged without it"):
        lora.init_adapters(jax.random.key(1), _boxed(cfg), with_embedding)


def _base_run(tmp_path, cfg=None):
    """A causal LM checkpoint to fine-tune from."""
    cfg = cfg or tiny_config(workdir=str(tmp_path / "base"))
    s = train.setup(cfg)
    state = train.init_state(s, jax.random.key(3))
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir))
    writer.save(1, state, {"data_step": 1, "config": C.to_dict(cfg)})
    writer.close()
    with open(tmp_path / "base" / "config.json", "w") as f:
        f.write(C.to_json(cfg))
    return cfg.workdir, jax.device_get(state.params)


def _lora_steps(cfg, devices, steps=2):
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
    state, _ = train.restore_or_init(s, None)
    frozen = train.initial_params(s, frozen_only=True)
    step = train.make_train_step(s, frozen=frozen)
    history = []
    for seed in range(steps):
        state, metrics = step(state, sharding.place_batch(packed_batch(seed=seed), s.mesh))
        history.append(jax.device_get(metrics))
    return s, state, frozen, history


def test_only_adapters_train_and_lora_is_the_same_on_8_devices(tmp_path):
    base_dir, base_params = _base_run(tmp_path)
    cfg = dataclasses.replace(tiny_config(workdir=str(tmp_path / "tuned")), init_from=base_dir,
                              finetune=C.FinetuneConfig(mode="lora", lora=LORA),
                              opt=C.OptConfig(learning_rate=1e-2, warmup_steps=1))
    s, state, frozen, history = _lora_steps(cfg, jax.devices())
    assert set(state.params) == {"head", "lora"} and state.params["head"] == {}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), base_params)
    # The optimizer holds state for the adapters only: a small fraction of the model.
    adapter_count = lora.count(state.params)
    assert adapter_count < 0.2 * lora.count(base_params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapter_count
    assert np.abs(jax.device_get(state.params["lora"]["blocks/attn/q"]["b"])).max() > 0  # B moved
    # The same steps on one device.
    _, _, _, single = _lora_steps(cfg, jax.devices()[:1])
    for got, want in zip(history, single):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)


def test_a_lora_run_loads_merged_through_the_restore_path(tmp_path):
    base_dir, base_params = _base_run(tmp_path)
    cfg = dataclasses.replace(tiny_config(workdir=str(tmp_path / "tuned")), init_from=base_dir,
                              finetune=C.FinetuneConfig(mode="lora", lora=LORA),
                              opt=C.OptConfig(learning_rate=1e-2, warmup_steps=1))
    s, state, frozen, _ = _lora_steps(cfg, jax.devices())
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir))
    writer.save(2, state, {"data_step": 2, "config": C.to_dict(cfg)})
    writer.close()
    with open(tmp_path / "tuned" / "config.json", "w") as f:
        f.write(C.to_json(cfg))
    loaded_cfg, params = restore.load_params(cfg.workdir)
    want = lora.merge(base_params, jax.device_get(state.params["lora"]), LORA)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), jax.device_get(params), want)
    assert set(params) == set(base_params)  # a plain model's params: sample, quantize, export as usual


def test_lora_dropout_changes_training_but_not_evaluation(tmp_path):
    """Dropout on the adapters' inputs, on an MoE model split expert-parallel (adapters on q, v and
    the experts): the first step's loss is the same (B = 0, whatever reaches it) but its gradient
    is not, and later losses differ; evaluation (no rng) drops nothing and equals the merged
    params' evaluation."""
    moe_cfg = with_model(tiny_config(workdir=str(tmp_path / "base"), mesh=C.MeshConfig(data=1, fsdp=2, expert=4)),
                         moe=C.MoeConfig(num_experts=4, top_k=2, dispatch="capacity"))
    base_dir, _ = _base_run(tmp_path, moe_cfg)
    targets = (r"(^|/)attn/(q|v)$", r"(^|/)mlp/(gate|up|down)$")
    runs = {}
    for rate in (0.0, 0.5):
        cfg = dataclasses.replace(moe_cfg, workdir=str(tmp_path / f"tuned{rate}"), init_from=base_dir,
                                  finetune=C.FinetuneConfig(mode="lora", lora=C.LoraConfig(rank=4, dropout=rate,
                                                                                           targets=targets)),
                                  opt=C.OptConfig(learning_rate=1e-2, warmup_steps=1))
        runs[rate] = _lora_steps(cfg, jax.devices(), steps=3)
    (_, _, _, plain), (s, state, frozen, dropped) = runs[0.0], runs[0.5]
    assert dropped[0]["loss"] == plain[0]["loss"] and dropped[0]["grad_norm"] != plain[0]["grad_norm"]
    assert dropped[2]["loss"] != plain[2]["loss"]  # step 0's learning rate is 0 (warm-up): B moves at step 1
    batch = sharding.place_batch(packed_batch(seed=5), s.mesh)
    got = train.make_eval_step(s, frozen=frozen)(state.params, batch)
    model_eval = s.family.eval_fn(s.model, s.cfg)
    with sharding.activate(s.mesh):
        want = jax.jit(lambda p, b, f: model_eval(s.plan.compose(p, f), b))(state.params, batch, frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), jax.device_get(got), jax.device_get(want))
