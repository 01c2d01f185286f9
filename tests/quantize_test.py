import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.training import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import restore
from jaxllm.cli import generate as generate_cli
from jaxllm.cli import quantize as quantize_cli
from jaxllm.compression import quantize
from jaxllm.training import train
from jaxllm.models import Transformer
from helpers import packed_batch, tiny_config

VALUES, SCALE = "int8", "scale"


def _float_params(cfg, seed=0):
    return nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def test_round_trip_error_is_within_half_a_step_per_output_channel():
    # A scanned q kernel [layers, D, H, K] whose output channels span four orders of magnitude:
    # a per-tensor scale would round the small channels to zero, a per-channel one may not.
    rng = np.random.default_rng(0)
    channel_scale = 10.0 ** rng.uniform(-3, 1, (3, 1, 4, 8))
    w = (rng.standard_normal((3, 16, 4, 8)) * channel_scale).astype(np.float32)
    q = quantize.quantize_array(w, (-3,))
    assert q[VALUES].dtype == jnp.int8 and q[SCALE].shape == (3, 1, 4, 8)
    scale = np.asarray(q[SCALE])
    error = np.abs(np.asarray(quantize.dequantize_array(q)) - w)
    assert (error <= scale / 2 * (1 + 1e-6)).all()
    # Symmetric with the full range used: the largest |value| of every channel is 127.
    np.testing.assert_array_equal(np.abs(np.asarray(q[VALUES])).max(axis=1), 127)
    np.testing.assert_allclose(scale[:, 0], np.abs(w).max(axis=1) / 127, rtol=1e-6)


def test_zeros_quantize_to_zero_so_pruned_weights_stay_pruned():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0  # 50% unstructured sparsity
    w[:, 3] = 0.0  # a fully pruned output channel
    q = quantize.quantize_array(w, (-2,))
    values = np.asarray(q[VALUES])
    assert (values[w == 0] == 0).all()
    assert np.isfinite(np.asarray(q[SCALE])).all()
    assert (np.asarray(quantize.dequantize_array(q))[w == 0] == 0).all()


def test_only_attention_mlp_and_expert_kernels_are_quantized():
    L, E, D, F, V = 2, 4, 8, 16, 32
    params = {
        "embed": {"embedding": jnp.ones((V, D))},
        "final_norm": {"scale": jnp.ones((D,))},
        "blocks": {
            "attn_norm": {"scale": jnp.ones((L, D))},
            "attn": {"q": jnp.ones((L, D, 2, 4)), "o": jnp.ones((L, 2, 4, D))},
            # MoE layout: router stays float, expert kernels [layers, E, D, F] / [layers, E, F, D].
            "mlp": {"router": {"kernel": jnp.ones((L, D, E))},
                    "gate": jnp.ones((L, E, D, F)), "down": jnp.ones((L, E, F, D)),
                    "shared": {"gate": jnp.ones((L, D, F)), "down": jnp.ones((L, F, D))}},
        },
        "unembed": jnp.ones((D, V)),
    }
    q = quantize.quantize_params(params)
    for path in (("embed", "embedding"), ("final_norm", "scale"), ("blocks", "attn_norm", "scale"),
                 ("blocks", "mlp", "router", "kernel"), ("unembed",)):
        leaf = q
        for key in path:
            leaf = leaf[key]
        assert leaf.dtype == jnp.float32, path
    assert q["blocks"]["attn"]["q"][SCALE].shape == (L, 1, 2, 4)
    assert q["blocks"]["attn"]["o"][SCALE].shape == (L, 1, 1, D)
    assert q["blocks"]["mlp"]["gate"][SCALE].shape == (L, E, 1, F)
    assert q["blocks"]["mlp"]["down"][SCALE].shape == (L, E, 1, D)
    assert q["blocks"]["mlp"]["shared"]["gate"][SCALE].shape == (L, 1, F)
    assert q["blocks"]["mlp"]["shared"]["down"][SCALE].shape == (L, 1, D)
    with pytest.raises(quantize.QuantizationError, match="already"):
        quantize.quantize_params(q)


@pytest.mark.parametrize("scan_layers,moe", [(True, False), (False, False), (True, True)],
                         ids=["scanned", "unscanned", "moe"])
def test_quantized_logits_are_close_to_float_logits(scan_layers, moe):
    """Bound: the RMS logit error is at most 2% of the spread (std) of what the quantized kernels
    contribute to the logits, and the largest error at most 5% of the logits' own spread.

    Why 2%: each weight moves by at most half a step, max|w|/254 per output channel, i.e. by a
    roughly uniform error of std max|w|/(254·sqrt(3)); for Gaussian weights (max|w| ≈ 3.5σ over a
    64-wide channel) that is ~0.8% of σ, so every quantized projection's output, and hence the
    kernels' contribution to the logits, is off by ~0.8% RMS (measured: 0.9%). The "contribution"
    is the float logits minus the logits with all quantized kernels zeroed; the rest (embedding,
    tied unembedding) stays float and adds no error. A scale on the wrong axis or a lost scale
    gives errors of the order of the contribution itself."""
    cfg = dataclasses.replace(tiny_config().model, scan_layers=scan_layers)
    if moe:  # expert kernels [layers, E, D, F] quantize per expert and output channel
        cfg = dataclasses.replace(cfg, moe=C.MoeConfig(num_experts=4, top_k=2, dispatch="dropless",
                                                       num_shared=1))
    params = _float_params(cfg)
    if moe:
        # The router stays float, but its input moves with the quantized layers below it; a random
        # init's router has near-tied logits, so that would flip top-k choices (a jump no weight
        # rounding bound covers). A decisive router, like a trained one, keeps the routing.
        params["blocks"]["mlp"]["router"] = params["blocks"]["mlp"]["router"] * 50.0
    batch = packed_batch()
    model = Transformer(cfg)
    jitted = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"], batch["segment_ids"],
                                           batch["positions"]))
    apply = lambda p: np.asarray(jitted(p))
    float_logits = apply(params)
    error = apply(quantize.quantize_params(params)) - float_logits
    without_kernels = jax.tree_util.tree_map_with_path(
        lambda path, x: x if quantize.contracting_axes(quantize._path_str(path)) is None else 0 * x,
        params)
    contribution = float_logits - apply(without_kernels)
    assert 0 < np.sqrt(np.mean(error ** 2)) <= 0.02 * contribution.std()
    assert np.abs(error).max() <= 0.05 * float_logits.std()


def _sharded(params, cfg):
    s = train.setup(cfg)
    return jax.device_put(params, s.state_shardings.params), s


def test_quantized_tree_is_sharded_like_the_float_tree_and_round_trips_through_orbax(tmp_path):
    cfg = tiny_config(mesh=C.MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    params, s = _sharded(_float_params(cfg.model), cfg)
    q = quantize.quantize_params(params)
    w_float, w_int8 = params["blocks"]["mlp"]["gate"], q["blocks"]["mlp"]["gate"]  # [layers, D, F]
    assert w_int8[VALUES].sharding.spec == w_float.sharding.spec == P(None, "fsdp", "tensor")
    assert w_int8[SCALE].sharding.spec == P(None, None, "tensor")  # output axis only
    # o [layers, H, K, D] contracts H (tensor) and K: its scale [layers, 1, 1, D] keeps D's fsdp.
    assert q["blocks"]["attn"]["o"][SCALE].sharding.spec == P(None, None, None, "fsdp")

    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"), C.CheckpointConfig(async_save=False))
    checkpointer.save(1, {"params": q}, {"quantization": {}})
    # Restore onto a different mesh: the layout comes from the abstract tree, not from the writer.
    cfg2 = tiny_config(mesh=C.MeshConfig(data=1, fsdp=4, tensor=2, expert=1))
    abstract = quantize.quantized_abstract(train.setup(cfg2).abstract_state.params)
    restored, _ = checkpointer.restore({"params": abstract}, partial=True)
    checkpointer.close()
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(restored["params"])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["params"]["blocks"]["mlp"]["gate"][VALUES].sharding.spec == P(None, "fsdp", "tensor")
    assert quantize.kernel_bytes(q) <= 0.27 * quantize.kernel_bytes(params)


def test_cli_writes_a_quantized_checkpoint_that_generation_and_evaluation_accept(tmp_path, capsys):
    workdir, out = str(tmp_path / "float"), str(tmp_path / "int8")
    cfg = tiny_config(workdir=workdir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2, eval_every=100),
                              checkpoint=C.CheckpointConfig(every=2, async_save=False))
    train.train(cfg, log=lambda record: None)

    quantize_cli.main(["--workdir", workdir, "--out", out, "--eval_batches", "1"])
    report = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kernel_bytes_int8"] <= 0.27 * report["kernel_bytes_float"]
    assert abs(report["eval_loss_int8"] - report["eval_loss_float"]) <= 0.01 * report["eval_loss_float"]

    _, params = restore.load_params(out)
    assert params["blocks"]["attn"]["q"][VALUES].dtype == jnp.int8
    generate_cli.main(["--workdir", out, "--prompt", "def ", "--prompt", "x", "--max_new_tokens", "3",
                       "--temperature", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("def ") and any(line.startswith("x") for line in lines[1:])

    with pytest.raises(SystemExit) as again:  # quantizing a quantized checkpoint
        quantize_cli.main(["--workdir", out, "--out", str(tmp_path / "twice")])
    assert again.value.code == 2 and "already" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        quantize_cli.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert missing.value.code == 2 and "not a jaxllm run directory" in capsys.readouterr().err

    # Sampling flags that cannot work are one-line errors, not tracebacks or silent garbage.
    for flags, message in ((["--top_k", "1000"], "--top_k 1000 is larger than the vocabulary (384)"),
                           (["--temperature", "-1"], "--temperature -1.0 must be 0 (greedy) or positive"),
                           (["--max_new_tokens", "-1"], "--max_new_tokens -1 must be 0 or more"),
                           (["--top_p", "0"], "--top_p 0.0 must be in (0, 1]"),
                           (["--tensor", "0"], "--tensor 0 must be 1 or more")):
        with pytest.raises(SystemExit) as bad:
            generate_cli.main(["--workdir", out, *flags])
        assert bad.value.code == 2 and message in capsys.readouterr().err

    from jaxllm.cli import prune

    for args, message in (([], "holds an int8-quantized checkpoint; prune the float run"),
                          (["--sparsity", "0.5"], "PruneConfig fields go as key=value")):
        with pytest.raises(SystemExit) as bad:
            prune.main(["--workdir", out, "--out", str(tmp_path / "pruned"), *args])
        assert bad.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "pruned")
