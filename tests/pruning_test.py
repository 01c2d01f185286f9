"""Pruning: mask kinds (exact per-tensor sparsity, one global threshold, N:M groups, expert tensors),
the optimizer wrapper (pruned weights stay exactly zero under AdamW with weight decay), the gradual
schedule's values, resume, and a pruned sharded step equal to one device."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxllm.training import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import validation
from jaxllm import data, sharding
from jaxllm.compression import pruning
from jaxllm.training import optim, train
from helpers import tiny_config, two_train_steps

Box = nn.Partitioned


def _synthetic_params(seed=0):
    """Layer-stacked attention/MLP kernels, an MoE expert stack [L, E, D, F] / [L, E, F, D], a
    router, a norm and an embedding, boxed with their logical axis names like model.init's."""
    keys = jax.random.split(jax.random.key(seed), 8)
    L, E, D, H, K, F, V = 2, 3, 16, 2, 8, 12, 20
    normal = lambda k, shape, scale=1.0: scale * jax.random.normal(k, shape)  # noqa: E731
    return {
        "blocks": {
            "attn": {
                "q": Box(normal(keys[0], (L, D, H, K)), ("layers", "embed", "heads", "head_dim")),
                "o": Box(normal(keys[1], (L, H, K, D), 10.0), ("layers", "heads", "head_dim", "embed")),
            },
            "mlp": {
                "gate": Box(normal(keys[2], (L, E, D, F)), ("layers", "expert", "embed", "mlp")),
                "down": Box(normal(keys[3], (L, E, F, D), 0.1), ("layers", "expert", "mlp", "embed")),
                "router": Box(normal(keys[4], (L, D, E)), ("layers", "embed", "expert")),
            },
            "attn_norm": {"scale": Box(normal(keys[5], (L, D)), ("layers", "norm"))},
        },
        "embed": {"embedding": Box(normal(keys[6], (V, D)), ("vocab", "embed"))},
    }


PRUNED = {"q", "k", "v", "o", "gate", "up", "down"}  # the default include, in the real model too


def _named_leaves(tree):
    return {optim.param_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _masks(kind, sparsity=0.5, **overrides):
    boxed = _synthetic_params()
    cfg = C.PruneConfig(kind=kind, sparsity=sparsity, **overrides)
    layouts = pruning.layouts_for(boxed, cfg)
    params = nn.meta.unbox(boxed)
    return params, pruning.compute_masks(params, layouts, cfg, sparsity), layouts


def _tensors(x, leading):
    """Each tensor of a stacked param as rows: [tensors, elements]."""
    x = np.asarray(x)
    return x.reshape(int(np.prod(x.shape[:leading])), -1)


LEADING = {"blocks/attn/q": 1, "blocks/attn/o": 1, "blocks/mlp/gate": 2, "blocks/mlp/down": 2}


def test_default_include_selects_attention_and_expert_kernels_only():
    _, _, layouts = _masks("magnitude")
    chosen = {layout.path for layout in layouts if layout is not None}
    assert chosen == set(LEADING)
    by_path = {layout.path: layout for layout in layouts if layout is not None}
    # Expert kernels: layers and experts are batch axes; q reads embed, o contracts heads and head_dim.
    assert by_path["blocks/mlp/gate"].batch_axes == (0, 1)
    assert by_path["blocks/mlp/gate"].contracting_axes == (2,)
    assert by_path["blocks/mlp/down"].contracting_axes == (2,)
    assert by_path["blocks/attn/o"].contracting_axes == (1, 2)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_prunes_every_tensor_to_the_target_keeping_the_largest(sparsity):
    params, masks, _ = _masks("magnitude", sparsity)
    weights, keep = _named_leaves(params), _named_leaves(masks)
    for path, leading in LEADING.items():
        w, m = _tensors(weights[path], leading), _tensors(keep[path], leading)
        assert w.shape[0] == {"blocks/attn/q": 2, "blocks/attn/o": 2}.get(path, 6)  # 2 layers x 3 experts
        for row_w, row_m in zip(w, m):
            pruned = (~row_m).sum()
            assert abs(pruned - sparsity * row_w.size) <= 1, (path, pruned, row_w.size)
            assert np.abs(row_w[~row_m]).max() <= np.abs(row_w[row_m]).min()


def test_global_magnitude_uses_one_threshold_across_tensors():
    params, masks, _ = _masks("global", 0.6)
    weights, keep = _named_leaves(params), _named_leaves(masks)
    w = np.concatenate([np.asarray(weights[p]).ravel() for p in LEADING])
    m = np.concatenate([np.asarray(keep[p]).ravel() for p in LEADING])
    assert abs((~m).sum() - 0.6 * w.size) <= 1
    assert np.abs(w[~m]).max() <= np.abs(w[m]).min()
    # The tensors were drawn at different scales, so one threshold prunes them very differently.
    per_tensor = {p: 1 - np.asarray(keep[p]).mean() for p in LEADING}
    assert per_tensor["blocks/mlp/down"] > 0.95 and per_tensor["blocks/attn/o"] < 0.1


def _groups(x, axis, m):
    moved = np.moveaxis(np.asarray(x), axis, -1)
    return moved.reshape(-1, m)


def test_two_of_four_holds_in_every_group_along_the_input_dimension():
    params, masks, _ = _masks("nm", n=2, m=4)
    weights, keep = _named_leaves(params), _named_leaves(masks)
    # Input axes: q [L, D, H, K] -> D; o [L, H, K, D] -> K (last of H, K); gate [L, E, D, F] -> D;
    # down [L, E, F, D] -> F.
    for path, axis in {"blocks/attn/q": 1, "blocks/attn/o": 2, "blocks/mlp/gate": 2, "blocks/mlp/down": 2}.items():
        w, m = _groups(weights[path], axis, 4), _groups(keep[path], axis, 4)
        np.testing.assert_array_equal(m.sum(axis=1), 2)
        kept_min = np.where(m, np.abs(w), np.inf).min(axis=1)
        pruned_max = np.where(m, -np.inf, np.abs(w)).max(axis=1)
        assert (pruned_max <= kept_min).all(), path


def test_nm_with_an_input_dimension_not_divisible_by_m_is_a_clear_error():
    with pytest.raises(C.ConfigError, match="not a multiple of prune.m=5"):
        _masks("nm", n=2, m=5)


def test_unselected_params_are_untouched():
    params, masks, layouts = _masks("global", 0.7)
    pruned = pruning.apply_masks(params, masks)
    for path, leaf in _named_leaves(pruned).items():
        if path.rsplit("/", 1)[-1] not in PRUNED:
            np.testing.assert_array_equal(leaf, _named_leaves(params)[path])
            assert _named_leaves(masks)[path].shape == ()  # no mask stored for them
    # And inside the optimizer: without global-norm clipping (which couples all params) the
    # unselected params follow exactly the inner optimizer's trajectory.
    opt = C.OptConfig(grad_clip=0.0, warmup_steps=0)
    inner = optim.make_optimizer(opt, 20)
    tx = pruning.prune_wrapper(inner, C.PruneConfig(kind="magnitude", sparsity=0.5))
    boxed = _synthetic_params()
    plain = _run_updates(inner, boxed, 5)
    wrapped = _run_updates(tx, boxed, 5)
    for path, leaf in _named_leaves(wrapped[0]).items():
        if path.rsplit("/", 1)[-1] not in PRUNED:
            np.testing.assert_array_equal(leaf, _named_leaves(plain[0])[path])


def _run_updates(tx, boxed, steps, seed=1):
    """`steps` optimizer steps with random gradients; returns (params, state, per-step params)."""
    params, state = nn.meta.unbox(boxed), nn.meta.unbox(tx.init(boxed))
    update = jax.jit(tx.update)
    history = []
    for step in range(steps):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), len(leaves))
        grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return params, state, history


def test_pruned_weights_stay_exactly_zero_through_adamw_with_weight_decay():
    opt = C.OptConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=0)
    cfg = C.PruneConfig(kind="magnitude", sparsity=0.6, schedule="one_shot", start_step=3)
    tx = pruning.prune_wrapper(optim.make_optimizer(opt, 40), cfg)
    params, state, history = _run_updates(tx, _synthetic_params(), 40)
    keep = _named_leaves(state.masks)
    for path in LEADING:
        before = _named_leaves(history[2])[path]
        assert (np.asarray(before) != 0).all()  # nothing pruned before start_step
        m = np.asarray(keep[path])
        assert abs((~m).mean() - 0.6) < 0.02
        for snapshot in history[3:]:
            w = np.asarray(_named_leaves(snapshot)[path])
            assert (w[~m] == 0).all() and (w[m] != 0).all()
    # The Adam moments of pruned weights are zero too (so nothing revives them).
    adam = [s for s in jax.tree.leaves(state.inner_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    for moments in (adam.mu, adam.nu):
        for path in LEADING:
            assert (np.asarray(_named_leaves(moments)[path])[~np.asarray(keep[path])] == 0).all()


GRADUAL = C.PruneConfig(kind="magnitude", sparsity=0.8, initial_sparsity=0.1, schedule="gradual",
                        start_step=4, every=3, num_updates=4)


def test_gradual_schedule_gives_the_formulas_values():
    def formula(t):  # Zhu & Gupta 2017, eq. 1
        return 0.8 + (0.1 - 0.8) * (1 - (t - 4) / (4 * 3)) ** 3

    expected = {0: 0.0, 3: 0.0, 4: formula(4), 6: formula(4), 7: formula(7), 10: formula(10),
                13: formula(13), 16: 0.8, 100: 0.8}
    for step, value in expected.items():
        np.testing.assert_allclose(pruning.target_sparsity(GRADUAL, step), value, rtol=1e-6, err_msg=str(step))
    assert [t for t in range(30) if pruning.is_update_step(GRADUAL, t)] == [4, 7, 10, 13, 16]
    # The masks in the optimizer follow it: measured sparsity after each step is the target.
    opt = C.OptConfig(learning_rate=0.01, warmup_steps=0)
    tx = pruning.prune_wrapper(optim.make_optimizer(opt, 20), GRADUAL)
    _, state, history = _run_updates(tx, _synthetic_params(), 18)
    for step, params in enumerate(history):
        metrics = pruning.train_metrics(state, params)
        target = float(pruning.target_sparsity(GRADUAL, step))
        for path in LEADING:
            per_tensor = np.asarray(metrics["sparsity/" + path])
            size = np.asarray(_named_leaves(params)[path]).size / len(per_tensor)
            np.testing.assert_allclose(per_tensor, target, atol=1 / size + 1e-7, err_msg=f"{path} step {step}")
    assert int(state.count) == 18


def test_bad_prune_config_is_a_clear_error():
    base = tiny_config()
    for prune, message in [
        (C.PruneConfig(kind="magnitud"), "prune.kind='magnitud'; choose one of none, magnitude, global, nm"),
        (C.PruneConfig(kind="global", sparsity=1.0), r"prune.sparsity=1.0 must be in \[0, 1\)"),
        (C.PruneConfig(kind="nm", schedule="gradual"), "use prune.schedule=one_shot"),
        (C.PruneConfig(kind="nm", n=4, m=4), "need 0 < n < m"),
        (C.PruneConfig(kind="magnitude", schedule="cubic"), "prune.schedule='cubic'"),
        (C.PruneConfig(kind="magnitude", include=("(",)), "invalid regex"),
    ]:
        with pytest.raises(C.ConfigError, match=message):
            validation.validate(dataclasses.replace(base, prune=prune))
    cfg = C.override(base, ["prune.kind=global", "prune.sparsity=0.25"])
    assert cfg.prune.kind == "global" and cfg.prune.sparsity == 0.25
    with pytest.raises(C.ConfigError, match="matches no parameter"):
        train.setup(dataclasses.replace(base, prune=C.PruneConfig(kind="global", include=("nothing",))))


def test_one_shot_prune_of_a_gradually_pruned_run_keeps_its_kind_but_not_its_schedule():
    from jaxllm.cli import prune

    gradual = C.PruneConfig(kind="global", schedule="gradual", sparsity=0.8, initial_sparsity=0.1,
                            start_step=30)
    cfg = prune.prune_config(dataclasses.replace(tiny_config(), prune=gradual), ["sparsity=0.05"])
    assert (cfg.prune.kind, cfg.prune.sparsity, cfg.prune.schedule) == ("global", 0.05, "one_shot")
    assert cfg.prune.initial_sparsity == 0.0 and cfg.prune.start_step == 0
    assert prune.prune_config(tiny_config(), ["sparsity=0.3"]).prune.kind == "magnitude"


# ---------------------------------------------------------------------------------------------
# In the train step and loop


def _pruned(cfg, prune):
    return dataclasses.replace(cfg, prune=prune)


def test_pruned_step_on_fsdp4_tensor2_equals_single_device():
    # Global ranking is the kind that needs every shard of every tensor; the mask is computed at
    # step 1, from parameters that one sharded optimizer step has already changed.
    prune = C.PruneConfig(kind="global", sparsity=0.7, start_step=1)
    cfg = _pruned(tiny_config(), prune)
    _, ref_state, ref_history = two_train_steps(cfg, jax.devices()[:1])
    _, state, history = two_train_steps(dataclasses.replace(cfg, mesh=C.MeshConfig(data=1, fsdp=4, tensor=2)))
    for got, want in zip(history, ref_history):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["sparsity"], want["sparsity"], rtol=1e-6)
    assert history[0]["sparsity"] == 0.0 and history[1]["sparsity"] == pytest.approx(0.7, abs=1e-4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state.masks),
                 jax.device_get(ref_state.opt_state.masks))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(ref_state.params))
    # The masks are sharded like the params they belong to.
    q_mask, q = state.opt_state.masks["blocks"]["attn"]["q"], state.params["blocks"]["attn"]["q"]
    assert q_mask.sharding.spec == q.sharding.spec


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory):
    """A 9-step run pruned gradually (mask updates at t = 2, 4, 6, 8), checkpointed at 4, 8, 9."""
    tmp = tmp_path_factory.mktemp("gradual")
    prune = C.PruneConfig(kind="magnitude", sparsity=0.8, schedule="gradual", start_step=2, every=2,
                          num_updates=3)
    cfg = tiny_config(workdir=str(tmp / "run"), prune=prune)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, data_dir=str(tmp / "tfds")),
        train=dataclasses.replace(cfg.train, steps=9, eval_every=100),
        checkpoint=C.CheckpointConfig(every=4, keep=3, async_save=False),
    )
    # One device: these tests are about the optimizer state surviving a restart, not about sharding.
    mesh = sharding.make_mesh(C.MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    return cfg, mesh, train.train(cfg, mesh=mesh)


def test_resumed_run_keeps_masks_and_schedule_position(gradual_run):
    cfg, mesh, full = gradual_run
    with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
        logged = {r["step"]: r["sparsity"] for r in map(json.loads, f)}
    assert logged[4] == pytest.approx(0.0) and logged[5] > 0  # the update at t=2 targets s_i = 0
    assert logged[9] == pytest.approx(0.8, abs=1e-3)

    # Resume from the step-4 checkpoint (one mask update behind the mask update at t=4) and replay.
    s = train.setup(cfg, mesh)
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir), read_only=True)
    with sharding.activate(mesh):
        state, meta = checkpointer.restore(s.abstract_state, step=4)
    checkpointer.close()
    assert int(state.opt_state.count) == 4 and meta["data_step"] == 4
    batches = data.train_batches(cfg)
    step_fn = train.make_train_step(s)
    for step in range(4, 9):
        state, metrics = step_fn(state, sharding.place_batch(batches.local_batch(step, 0, 1), mesh))
        assert float(metrics["sparsity"]) == logged[step + 1]
    assert int(state.opt_state.count) == int(full.opt_state.count) == 9
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state.masks),
                 jax.device_get(full.opt_state.masks))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(full.params))


def test_prune_command_prunes_a_checkpoint_and_reports_the_losses(gradual_run, tmp_path, capsys):
    from jaxllm import restore
    from jaxllm.cli import prune

    cfg, _, _ = gradual_run
    out = str(tmp_path / "pruned")
    prune.main(["--workdir", cfg.workdir, "--out", out, "kind=global", "sparsity=0.9", "--eval_batches", "1"])
    printed = capsys.readouterr().out
    for path in ("blocks/attn/q", "blocks/attn/o", "blocks/mlp/gate", "blocks/mlp/down"):
        assert path in printed
    assert "sparsity 0.8000 -> 0.9000" in printed  # the run had reached 80% per tensor
    assert "validation loss (1 batches):" in printed

    _, original = restore.load_params(cfg.workdir)
    pruned_cfg, pruned = restore.load_params(out)
    assert pruned_cfg.prune.kind == "global" and pruned_cfg.prune.sparsity == 0.9
    zeros = total = 0
    original = _named_leaves(jax.device_get(original))
    for path, leaf in _named_leaves(jax.device_get(pruned)).items():
        leaf, before = np.asarray(leaf), np.asarray(original[path])
        if path.rsplit("/", 1)[-1] in PRUNED:
            zeros, total = zeros + (leaf == 0).sum(), total + leaf.size
            np.testing.assert_array_equal(leaf[leaf != 0], before[leaf != 0])
        else:
            np.testing.assert_array_equal(leaf, before)
    assert abs(zeros - 0.9 * total) <= 1

    with pytest.raises(SystemExit):
        prune.main(["--workdir", cfg.workdir, "--out", str(tmp_path / "new"), "kind=magnitud"])
    assert "error: kind='magnitud'; choose one of none, magnitude" in capsys.readouterr().err

    # An --out that is already a run is refused before anything is written into it.
    config_before = open(os.path.join(out, "config.json")).read()
    steps_before = sorted(os.listdir(ckpt.checkpoint_dir(out)))
    with pytest.raises(SystemExit):
        prune.main(["--workdir", cfg.workdir, "--out", out, "kind=magnitude", "sparsity=0.5"])
    assert "already holds checkpoints; choose a new --out" in capsys.readouterr().err
    assert open(os.path.join(out, "config.json")).read() == config_before
    assert sorted(os.listdir(ckpt.checkpoint_dir(out))) == steps_before


def test_pruning_an_expert_parallel_moe_model_prunes_each_expert_and_keeps_zeros():
    # A real MoE model on data=2 x expert=4: 2:4 holds in every expert's kernels (each expert is
    # its own tensor), the router is never pruned, and pruned expert weights stay zero.
    cfg = _pruned(tiny_config(), C.PruneConfig(kind="nm", n=2, m=4, start_step=0))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=C.MoeConfig(num_experts=4, top_k=2)),
                              mesh=C.MeshConfig(data=2, fsdp=1, expert=4))
    _, state, history = two_train_steps(cfg)
    params = jax.device_get(state.params)["blocks"]["mlp"]
    for name in ("gate", "up"):  # [layers, E, D, F]: groups of 4 along D
        w = np.asarray(params[name])
        groups = w.reshape(*w.shape[:2], w.shape[2] // 4, 4, w.shape[3])
        assert np.all((groups != 0).sum(axis=3) <= 2), name
        assert np.all((groups != 0).sum(axis=3) == 2), name  # and nothing beyond the mask is zero
    assert np.all(np.asarray(params["router"]) != 0)
    assert history[1]["sparsity"] == pytest.approx(history[0]["sparsity"]) and history[0]["sparsity"] > 0.4
