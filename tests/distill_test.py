"""Distillation: the losses (pure functions) and the teacher-student trainer."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.training import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import validation
from jaxllm import decoding, losses, sharding
from jaxllm.compression import distill
from jaxllm.training import train
from helpers import packed_batch, tiny_config

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)]


def _logits(seed, shape=(2, 5, 16), scale=2.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


def _soft(student, teacher, weights=None, kind="forward_kl", temperature=1.0, beta=0.5, top_k=0):
    if weights is None:
        weights = jnp.ones(student.shape[:-1])
    return losses.distillation_loss(student, teacher, weights, kind, temperature, beta, top_k)[0]


def _kl_numpy(p, q):
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0), axis=-1)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("kind,beta", KINDS)
def test_soft_loss_is_zero_for_equal_logits_and_positive_otherwise(kind, beta):
    teacher, student = _logits(0), _logits(1)
    for temperature in (1.0, 3.0):
        same = _soft(teacher, teacher, kind=kind, beta=beta, temperature=temperature)
        np.testing.assert_allclose(same, 0.0, atol=1e-5)
        assert _soft(student, teacher, kind=kind, beta=beta, temperature=temperature) > 1e-2
    # A shift of all logits is the same distribution.
    np.testing.assert_allclose(_soft(teacher + 7.0, teacher, kind=kind, beta=beta), 0.0, atol=1e-4)


def test_kls_match_numpy_and_jsd_reduces_to_them_at_beta_0_and_1():
    teacher, student = _logits(0), _logits(1)
    p, q = _softmax(np.asarray(teacher, np.float64)), _softmax(np.asarray(student, np.float64))
    forward = _soft(student, teacher, kind="forward_kl")
    reverse = _soft(student, teacher, kind="reverse_kl")
    np.testing.assert_allclose(forward, _kl_numpy(p, q).sum(), rtol=1e-4)
    np.testing.assert_allclose(reverse, _kl_numpy(q, p).sum(), rtol=1e-4)
    assert abs(float(forward) - float(reverse)) > 1e-2  # so the checks below can tell them apart
    np.testing.assert_allclose(_soft(student, teacher, kind="jsd", beta=0.0), forward, rtol=1e-6)
    np.testing.assert_allclose(_soft(student, teacher, kind="jsd", beta=1.0), reverse, rtol=1e-6)
    # ... and it is continuous there: the endpoints are limits, not special cases.
    np.testing.assert_allclose(_soft(student, teacher, kind="jsd", beta=1e-4), forward, rtol=5e-3)
    np.testing.assert_allclose(_soft(student, teacher, kind="jsd", beta=1 - 1e-4), reverse, rtol=5e-3)
    # At beta = 0.5: 4x the classic Jensen-Shannon divergence.
    m = 0.5 * (p + q)
    classic = 0.5 * _kl_numpy(p, m) + 0.5 * _kl_numpy(q, m)
    np.testing.assert_allclose(_soft(student, teacher, kind="jsd", beta=0.5), 4 * classic.sum(), rtol=1e-4)


def test_temperature_squared_keeps_the_gradient_magnitude_independent_of_temperature():
    """Hinton et al. (2015): d KL_T / d z_i = (q_i - p_i) / T -> (z_i - v_i) / (V T^2) for large T
    and zero-mean logits, so T^2 * KL_T has a T-independent gradient (z - v) / V. Checked with
    central finite differences of the loss value (a wide step: float32 rounding of the loss, times
    T^2, swamps a narrow one; the loss is nearly quadratic at high T), not with autodiff."""
    V = 16
    student = _logits(1, (1, 1, V), 1.0)
    teacher = _logits(0, (1, 1, V), 1.0)
    student, teacher = student - student.mean(), teacher - teacher.mean()

    def finite_difference_grad(temperature, eps=0.25):
        def f(z):
            return float(_soft(z, teacher, temperature=temperature))

        grad = np.zeros(V)
        for i in range(V):
            step = jnp.zeros_like(student).at[0, 0, i].set(eps)
            grad[i] = (f(student + step) - f(student - step)) / (2 * eps)
        return grad

    limit = np.asarray((student - teacher)[0, 0]) / V
    norms, errors = {}, {}
    for temperature in (1.0, 8.0, 32.0):
        grad = finite_difference_grad(temperature)
        norms[temperature] = np.linalg.norm(grad)
        errors[temperature] = np.linalg.norm(grad - limit) / np.linalg.norm(limit)
        # Autodiff agrees with the finite differences.
        auto = jax.grad(lambda z: _soft(z, teacher, temperature=temperature))(student)[0, 0]
        np.testing.assert_allclose(auto, grad, rtol=0.02, atol=2e-3 * np.abs(grad).max())
    # The approximation error falls as 1/T: the scaled gradient converges to the T-free limit.
    assert errors[32.0] < 0.05 and errors[8.0] < 0.2 and errors[32.0] < errors[8.0] / 2, errors
    np.testing.assert_allclose(norms[8.0], norms[32.0], rtol=0.1)
    # Without the T^2 factor the gradient would shrink 16x from T=8 to T=32.
    unscaled = {t: norms[t] / t**2 for t in norms}
    np.testing.assert_allclose(unscaled[8.0] / unscaled[32.0], 16.0, rtol=0.1)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_masked_positions_contribute_nothing(kind, beta):
    teacher, student = _logits(0), _logits(1)
    weights = jnp.ones((2, 5)).at[:, 3:].set(0.0)
    full = losses.distillation_loss(student, teacher, weights, kind, 2.0, beta)
    # Anything at masked positions, even -inf, inf or NaN-free garbage, changes nothing.
    garbage = student.at[:, 3:].set(1e30).at[:, 3:, 0].set(-jnp.inf)
    changed = losses.distillation_loss(garbage, teacher.at[:, 4:].set(-5.0), weights, kind, 2.0, beta)
    np.testing.assert_allclose(changed[0], full[0], rtol=1e-6)
    assert float(full[1]) == 6.0
    grad = jax.grad(lambda z: losses.distillation_loss(z, teacher, weights, kind, 2.0, beta)[0])(student)
    assert np.all(np.asarray(grad[:, 3:]) == 0) and np.any(np.asarray(grad[:, :3]) != 0)
    # The same for the hidden-state losses.
    s_h, t_h = _logits(2, (2, 5, 8)), _logits(3, (2, 5, 8))
    for hidden_kind in losses.HIDDEN_LOSSES:
        base = losses.hidden_state_loss(s_h, t_h, weights, hidden_kind)[0]
        moved = losses.hidden_state_loss(s_h.at[:, 3:].set(9.0), t_h, weights, hidden_kind)[0]
        np.testing.assert_allclose(moved, base, rtol=1e-6)


@pytest.mark.parametrize("kind,beta", KINDS + [("forward_kl_top_k", 0.5), ("jsd_top_k", 0.5)])
def test_extreme_logits_give_finite_values_and_gradients(kind, beta):
    top_k = 3 if kind.endswith("_top_k") else 0
    kind = kind.removesuffix("_top_k")
    V = 8
    teacher = jnp.array([
        [0.0, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf],  # one-hot
        [1e30, -1e30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-jnp.inf] * V,  # degenerate row
        [50.0, -50.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0],
    ])[None]
    student = jnp.array([
        [-jnp.inf, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # no mass where the teacher has all of it
        [-1e30, 1e30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0] * V,
        [-jnp.inf, 80.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])[None]
    weights = jnp.ones((1, 4))
    for temperature in (0.5, 1.0, 4.0):
        def f(s, t):
            return losses.distillation_loss(s, t, weights, kind, temperature, beta, top_k)[0]

        value = f(student, teacher)
        grads = jax.grad(f, argnums=(0, 1))(student, teacher)
        assert np.isfinite(value) and value > 0, value
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))
    assert np.isfinite(losses.top1_agreement(student, teacher, weights))
    zeros = jnp.zeros((1, 4, 6))
    for hidden_kind in losses.HIDDEN_LOSSES:
        g = jax.grad(lambda s: losses.hidden_state_loss(s, zeros, weights, hidden_kind)[0])(zeros)
        assert np.all(np.isfinite(np.asarray(g)))


def test_top_k_keeps_the_teachers_k_largest_logits_renormalised():
    teacher, student = _logits(0), _logits(1)
    k = 4
    t = np.asarray(teacher, np.float64)
    kth = np.sort(t, -1)[..., -k][..., None]
    p = np.where(t >= kth, _softmax(np.where(t >= kth, t, -np.inf)), 0.0)
    q = _softmax(np.asarray(student, np.float64))
    np.testing.assert_allclose(_soft(student, teacher, top_k=k), _kl_numpy(p, q).sum(), rtol=1e-4)
    np.testing.assert_allclose(_soft(student, teacher, top_k=16), _soft(student, teacher), rtol=1e-6)
    # Zero when the student matches the truncated teacher on its support ... up to the rest.
    assert _soft(student, teacher, top_k=k) != _soft(student, teacher)


def test_hidden_state_losses():
    s, t = _logits(2, (2, 5, 8)), _logits(3, (2, 5, 8))
    w = jnp.ones((2, 5))
    for kind in losses.HIDDEN_LOSSES:
        np.testing.assert_allclose(losses.hidden_state_loss(t, t, w, kind)[0], 0.0, atol=1e-5)
        assert losses.hidden_state_loss(s, t, w, kind)[0] > 1e-2
    # Cosine ignores scale, MSE does not; cosine of opposite vectors is 2 per token.
    np.testing.assert_allclose(losses.hidden_state_loss(3 * t, t, w, "cosine")[0], 0.0, atol=1e-5)
    assert losses.hidden_state_loss(3 * t, t, w, "mse")[0] > 1e-2
    np.testing.assert_allclose(losses.hidden_state_loss(-t, t, w, "cosine")[0], 2.0 * 10, rtol=1e-5)


def test_top1_agreement_counts_weighted_matches():
    teacher = jnp.array([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    student = jnp.array([[[0.0, 2.0], [0.0, 1.0], [3.0, 0.0]]])
    assert float(losses.top1_agreement(student, teacher, jnp.array([[1.0, 1.0, 0.0]]))) == 1.0
    assert float(losses.top1_agreement(student, teacher, jnp.ones((1, 3)))) == 2.0


# ---------------------------------------------------------------------------------------------
# Config


def _distill_config(teacher_workdir="t", **distill_overrides):
    cfg = tiny_config()
    teacher = dataclasses.replace(cfg.model, d_model=96, num_layers=3, num_heads=4, num_kv_heads=4, mlp_dim=192)
    student = dataclasses.replace(cfg.model, d_model=64, num_layers=2)
    d = C.DistillConfig(teacher_workdir=str(teacher_workdir), teacher=teacher, loss="jsd", beta=0.3,
                        temperature=2.0, alpha=0.7, hidden_layers=("0:1", "1:2"), hidden_loss="cosine",
                        hidden_weight=0.5)
    return dataclasses.replace(cfg, model=student, distill=dataclasses.replace(d, **distill_overrides))


@pytest.mark.parametrize("overrides,message", [
    (["distill.loss=kl"], "forward_kl, reverse_kl, jsd"),
    (["distill.beta=1.5"], "distill.beta"),
    (["distill.alpha=-0.1"], "distill.alpha"),
    (["distill.temperature=0"], "distill.temperature"),
    (["distill.teacher.vocab_size=512"], "share a vocabulary"),
    (["distill.hidden_layers=0:9"], "teacher layer 9"),
    (["distill.hidden_layers=2:0"], "student layer 2"),
    (["distill.hidden_layers=one"], "student_layer:teacher_layer"),
    (["distill.hidden_loss=l1"], "cosine, mse"),
    (["distill.loss=reverse_kl", "distill.top_k=5"], "top_k"),
    (["distill.teacher.num_heads=5"], "distill.teacher"),
])
def test_bad_distill_values_are_clear_errors(overrides, message):
    cfg = C.override(_distill_config(), overrides)
    with pytest.raises(C.ConfigError, match=message):
        validation.validate(cfg)


# ---------------------------------------------------------------------------------------------
# Trainer


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A teacher checkpoint written on an fsdp=8 mesh (step 3 of random init: the trainer must
    only restore it, whatever mesh wrote it)."""
    workdir = tmp_path_factory.mktemp("teacher")
    cfg = distill.teacher_training_config(_distill_config(workdir, teacher_train_steps=3))
    s = train.setup(cfg, sharding.make_mesh(C.MeshConfig(data=1, fsdp=8)))
    state = train.init_state(s, jax.random.key(42))
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir))
    checkpointer.save(3, state, {"data_step": 3, "config": C.to_dict(cfg)})
    checkpointer.close()
    return workdir, jax.device_get(state.params)


def _distill_steps(cfg, mesh, steps=2):
    s = distill.setup(cfg, mesh)
    state = train.init_state(s, jax.random.key(0))
    step = distill.make_distill_step(s)
    history = []
    for seed in range(steps):
        state, metrics = step(state, sharding.place_batch(packed_batch(seed=seed), s.mesh))
        history.append(jax.device_get(metrics))
    return s, state, history


@pytest.fixture(scope="module")
def single_device_distill(teacher_workdir):
    cfg = _distill_config(teacher_workdir[0])
    return _distill_steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def test_distillation_step_on_data2_fsdp4_equals_single_device(teacher_workdir, single_device_distill):
    _, ref_state, ref_history = single_device_distill
    cfg = _distill_config(teacher_workdir[0])
    _, state, history = _distill_steps(cfg, sharding.make_mesh(C.MeshConfig(data=2, fsdp=4)))
    for got, want in zip(history, ref_history):
        for name in ("loss", "grad_norm", "distill_loss", "hidden_loss", "agreement", "objective"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(ref_state.params))
    # The learned projection is part of the student's params and is trained.
    assert state.params[distill.PROJECTION].shape == (2, 64, 96)
    s0 = distill.setup(cfg, sharding.make_mesh(C.MeshConfig(data=2, fsdp=4)))
    initial = jax.device_get(train.init_state(s0, jax.random.key(0)).params[distill.PROJECTION])
    assert not np.allclose(jax.device_get(state.params[distill.PROJECTION]), initial)


def test_metrics_are_the_hard_loss_distillation_loss_and_agreement(single_device_distill):
    _, _, history = single_device_distill
    m = history[0]
    np.testing.assert_allclose(m["hard_loss"], m["loss"], rtol=1e-6)
    assert 0.0 <= m["agreement"] <= 1.0 and m["distill_loss"] > 0 and m["hidden_loss"] > 0
    d = _distill_config().distill
    expected = d.alpha * m["distill_loss"] + (1 - d.alpha) * m["hard_loss"] + d.hidden_weight * m["hidden_loss"]
    np.testing.assert_allclose(m["objective"], expected, rtol=1e-5)


def test_teacher_is_restored_unchanged_and_gets_no_gradient(teacher_workdir):
    workdir, saved_params = teacher_workdir
    cfg = _distill_config(workdir, hidden_layers=())
    s = distill.setup(cfg, sharding.make_mesh(C.MeshConfig(data=2, fsdp=4)))
    teacher = distill.restore_teacher(cfg, s.mesh)
    # Restored onto this mesh with the teacher's own logical shardings.
    assert teacher["blocks"]["mlp"]["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher), saved_params)

    state = train.init_state(s, jax.random.key(0))
    batch = sharding.place_batch(packed_batch(), s.mesh)
    loss_fn = distill.distill_loss_fn(s)
    with sharding.activate(s.mesh):
        teacher_grads = jax.jit(jax.grad(lambda t: loss_fn(state.params, batch, t)[0]))(teacher)
    for g in jax.tree.leaves(teacher_grads):
        assert np.all(np.asarray(g) == 0)

    step = train.make_train_step(s, loss_fn, frozen=teacher)
    for seed in range(2):
        state, metrics = step(state, sharding.place_batch(packed_batch(seed=seed), s.mesh))
    assert np.isfinite(metrics["loss"])
    # Not donated, not updated: still the checkpoint's values.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher), saved_params)


def test_missing_teacher_checkpoint_says_where_it_looked_and_how_to_make_one(tmp_path):
    cfg = _distill_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        distill.train(cfg)
    assert "teacher_train_steps" in str(info.value) and "experiments/tiny_lm.py" in str(info.value)


def test_teacher_config_that_differs_from_the_checkpoint_is_a_clear_error(teacher_workdir):
    cfg = _distill_config(teacher_workdir[0])
    cfg = C.override(cfg, ["distill.teacher.mlp_dim=256"])
    with pytest.raises(C.ConfigError, match="mlp_dim"):
        distill.restore_teacher(cfg, sharding.make_mesh(cfg.mesh))


def test_distill_run_trains_a_missing_teacher_then_the_student_and_generation_still_loads(tmp_path):
    teacher = dataclasses.replace(tiny_config().model, d_model=64, num_layers=2)
    student = dataclasses.replace(teacher, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64, num_layers=1)
    cfg = dataclasses.replace(
        tiny_config(workdir=str(tmp_path / "student")), model=student,
        train=dataclasses.replace(tiny_config().train, steps=2, eval_every=2),
        checkpoint=C.CheckpointConfig(every=2, async_save=False),
        distill=C.DistillConfig(teacher_workdir=str(tmp_path / "teacher"), teacher=teacher,
                                teacher_train_steps=2, hidden_layers=("0:1",)),
    )
    records = []
    distill.train(cfg, log=records.append)
    assert distill.has_teacher_checkpoint(cfg.distill)
    student_records = records[len(records) // 2:]
    assert {"distill_loss", "hard_loss", "agreement", "hidden_loss", "eval_bits_per_byte"} <= set(student_records[-1])
    # The distilled student's checkpoint (with its projection) still samples as a plain model.
    saved = json.load(open(os.path.join(cfg.workdir, "config.json")))
    assert saved["distill"]["teacher_workdir"] == str(tmp_path / "teacher")
    text = decoding.sample_from_workdir(cfg.workdir, "def ", max_new_tokens=4)
    assert text.startswith("def ")


# ---------------------------------------------------------------------------------------------
# MoE on either side


def test_dense_teacher_to_moe_student_expert_parallel_equals_single_device(teacher_workdir):
    # Every other student block is MoE: the hidden-state pairs read both kinds of block.
    cfg = _distill_config(teacher_workdir[0])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, moe=C.MoeConfig(num_experts=4, top_k=2, every=2)))
    _, _, single = _distill_steps(cfg, sharding.make_mesh(C.MeshConfig(data=1, fsdp=1), jax.devices()[:1]))
    _, _, sharded = _distill_steps(cfg, sharding.make_mesh(C.MeshConfig(data=2, fsdp=1, expert=4)))
    for got, want in zip(sharded, single):
        for name in ("loss", "grad_norm", "distill_loss", "hidden_loss", "objective", "moe/loss"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    # The student's router losses are part of its objective.
    m, d = single[0], cfg.distill
    assert m["moe/loss"] > 0
    expected = (d.alpha * m["distill_loss"] + (1 - d.alpha) * m["hard_loss"]
                + d.hidden_weight * m["hidden_loss"] + m["moe/loss"])
    np.testing.assert_allclose(m["objective"], expected, rtol=1e-5)


def test_moe_teacher_written_expert_parallel_distils_into_a_dense_student(tmp_path):
    moe_teacher = dataclasses.replace(_distill_config().distill.teacher,
                                      moe=C.MoeConfig(num_experts=4, top_k=2))
    cfg = _distill_config(tmp_path, teacher=moe_teacher)
    teacher_cfg = distill.teacher_training_config(dataclasses.replace(
        cfg, distill=dataclasses.replace(cfg.distill, teacher_train_steps=1)))
    s = train.setup(teacher_cfg, sharding.make_mesh(C.MeshConfig(data=2, fsdp=1, expert=4)))
    saved = train.init_state(s, jax.random.key(3))
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(tmp_path))
    checkpointer.save(1, saved, {"data_step": 1, "config": C.to_dict(teacher_cfg)})
    checkpointer.close()

    mesh = sharding.make_mesh(C.MeshConfig(data=2, fsdp=4))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(distill.restore_teacher(cfg, mesh)),
                 jax.device_get(saved.params))
    _, _, history = _distill_steps(cfg, mesh)
    for m in history:
        assert all(np.isfinite(m[k]) for k in ("loss", "distill_loss", "hidden_loss", "agreement"))
        assert not any(k.startswith("moe/") for k in m), "a dense student has no router metrics"
        assert m["hidden_loss"] > 0 and 0.0 <= m["agreement"] <= 1.0


def test_a_teacher_trained_by_the_run_is_unpruned_and_always_checkpointed(tmp_path):
    cfg = _distill_config(tmp_path, teacher_train_steps=7)
    cfg = dataclasses.replace(cfg, prune=C.PruneConfig(kind="nm", n=2, m=4),
                              checkpoint=dataclasses.replace(cfg.checkpoint, every=0))
    teacher_cfg = distill.teacher_training_config(cfg)
    assert teacher_cfg.prune == C.PruneConfig()  # the student's pruning stays the student's
    assert teacher_cfg.checkpoint.every == 7  # the student restores the teacher's last step
    assert teacher_cfg.model == cfg.distill.teacher and teacher_cfg.train.steps == 7
