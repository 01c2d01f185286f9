"""The sequence-classification family (models/classifier.py) and fine-tuning it from a language
model: pooling, metrics, sharded equals single device (fsdp x tensor, and an MoE backbone
expert-parallel), full / probe / LoRA starts from a pre-trained run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import sharding
from jaxllm.cli import classify as classify_cli
from jaxllm.models import classifier
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train
from helpers import tiny_config

CLASSES = 3


def class_batch(seed=0, batch_size=8, seq_len=32, side="right"):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, seq_len + 1, batch_size)
    inputs = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for row, n in enumerate(lengths):
        where = slice(0, n) if side == "right" else slice(seq_len - n, seq_len)
        inputs[row, where] = rng.integers(0, 259, n)
        segment_ids[row, where] = 1
        positions[row, where] = np.arange(n)
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions,
            "labels": rng.integers(0, CLASSES, batch_size).astype(np.int32),
            "weights": np.ones(batch_size, np.float32)}


def classifier_config(**overrides):
    cfg = dataclasses.replace(tiny_config(), family="classifier",
                              classifier=C.ClassifierConfig(num_classes=CLASSES),
                              opt=C.OptConfig(learning_rate=3e-3, warmup_steps=1))
    return dataclasses.replace(cfg, **overrides)


def test_last_token_pooling_finds_the_last_real_token_for_either_padding_side():
    hidden = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
    right = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = jnp.asarray([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert classifier.last_token(hidden, right)[:, 0].tolist() == [2.0, 11.0]
    assert classifier.last_token(hidden, left)[:, 0].tolist() == [5.0, 11.0]
    assert classifier.mean_over_tokens(hidden, left)[:, 0].tolist() == [4.0, 9.0]


def test_the_same_text_padded_left_or_right_gets_the_same_logits():
    cfg = classifier_config()
    model = classifier.build(cfg)
    right, left = class_batch(side="right"), class_batch(side="left")
    params = jax.jit(model.init)(jax.random.key(0), right["inputs"])["params"]
    logits = [model.apply({"params": params}, b["inputs"], b["segment_ids"], b["positions"]) for b in (right, left)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_macro_f1_and_the_confusion_matrix():
    confusion = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]], np.float64)  # class 2 never occurs
    m = classifier.eval_metrics({"loss_sum": 7.0, "weight_sum": 8.0, "confusion": confusion})
    f1 = [2 * 3 / (4 + 3), 2 * 2 / (4 + 3)]
    assert m["eval_accuracy"] == 5 / 8 and m["eval_confusion"] == confusion.astype(int).tolist()
    np.testing.assert_allclose(m["eval_macro_f1"], np.mean(f1))


def _steps(cfg, devices, steps=2, frozen=None):
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
    state, _ = train.restore_or_init(s, None)
    frozen = train.initial_params(s, frozen_only=True) if s.plan.freezes else None
    step = train.make_train_step(s, frozen=frozen)
    history = []
    for seed in range(steps):
        state, metrics = step(state, sharding.place_batch(class_batch(seed=seed), s.mesh))
        history.append(jax.device_get(metrics))
    return s, state, history


@pytest.mark.parametrize("mesh_cfg, moe", [(C.MeshConfig(data=1, fsdp=4, tensor=2), False),
                                           (C.MeshConfig(data=1, fsdp=2, tensor=1, expert=4), True)],
                         ids=["fsdp4_tensor2", "moe_expert4"])
def test_classifier_step_on_8_devices_equals_single_device(mesh_cfg, moe):
    cfg = classifier_config(mesh=mesh_cfg)
    if moe:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=C.MoeConfig(num_experts=4, top_k=2)))
    _, state, history = _steps(cfg, jax.devices())
    _, single_state, single = _steps(dataclasses.replace(cfg, mesh=C.MeshConfig(1, 1, 1, 1)), jax.devices()[:1])
    for got, want in zip(history, single):
        for name in ("loss", "grad_norm", "accuracy"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
    # Adam divides by the gradient's root mean square: where that is tiny, float summation order
    # moves an update by up to ~lr·1e-3, hence the absolute tolerance.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 jax.device_get(state.params), jax.device_get(single_state.params))
    assert history[-1]["loss"] != history[0]["loss"]


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    """A causal LM checkpoint (random init, step 1) to start classifiers from."""
    workdir = str(tmp_path_factory.mktemp("lm"))
    cfg = tiny_config(workdir=workdir)
    s = train.setup(cfg)
    state = train.init_state(s, jax.random.key(7))
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir))
    writer.save(1, state, {"data_step": 1, "config": C.to_dict(cfg)})
    writer.close()
    with open(f"{workdir}/config.json", "w") as f:
        f.write(C.to_json(cfg))
    return workdir, jax.device_get(state.params)


@pytest.mark.parametrize("mode", ["full", "probe", "lora"])
def test_starting_from_a_language_model(mode, language_model):
    workdir, lm_params = language_model
    cfg = classifier_config(init_from=workdir, finetune=C.FinetuneConfig(mode=mode))
    s = train.setup(cfg)
    state, _ = train.restore_or_init(s, None)
    frozen = train.initial_params(s, frozen_only=True) if s.plan.freezes else None
    backbone = jax.device_get(state.params["backbone"] if mode == "full" else frozen)
    # The backbone is the language model without its LM head; the head is new.
    jax.tree.map(np.testing.assert_array_equal, backbone, {k: v for k, v in lm_params.items() if k != "unembed"})
    trainable = set(state.params) if mode != "lora" else set(state.params["head"]) | {"lora"}
    assert trainable == {"full": {"backbone", "score"}, "probe": {"score"}, "lora": {"score", "lora"}}[mode]
    _, state_after, history = _steps(cfg, jax.devices())
    if mode != "full":  # the frozen backbone comes from the language model, unchanged
        jax.tree.map(np.testing.assert_array_equal,
                     jax.device_get(train.initial_params(s, frozen_only=True)), backbone)
    assert np.isfinite(history[-1]["loss"])


def test_a_backbone_with_another_tokenizer_or_shape_is_a_clear_error(language_model):
    workdir, _ = language_model
    other = dataclasses.replace(tiny_config().model, tokenizer="tests/fixtures/hf/llama", vocab_size=384)
    cfg = classifier_config(init_from=workdir, model=other)
    s = train.setup(cfg)
    with pytest.raises(C.ConfigError, match=r"init_from=.* was trained with a different model: model.tokenizer "
                                             r"\(theirs 'bytes', ours 'tests/fixtures/hf/llama'\)"):
        train.restore_or_init(s, None)
    cfg = classifier_config(init_from=workdir, model=dataclasses.replace(tiny_config().model, d_model=96))
    with pytest.raises(C.ConfigError, match=r"model.d_model \(theirs 64, ours 96\)"):
        train.restore_or_init(train.setup(cfg), None)


def _folder_data(tmp_path):
    root = tmp_path / "reviews"
    rng = np.random.default_rng(0)
    words = {"good": ["great", "fine", "lovely", "superb"], "bad": ["awful", "poor", "dull", "broken"],
             "meh": ["okay", "so-so", "average", "plain"]}
    for label, vocab in words.items():
        (root / label).mkdir(parents=True)
        for k in range(12):
            (root / label / f"{k}.txt").write_text(" ".join(rng.choice(vocab, 12)))
    return str(root)


def test_resuming_a_lora_classifier_mid_run_equals_the_uninterrupted_run(language_model, tmp_path, capsys):
    workdir, _ = language_model

    def run(name, steps):
        cfg = classifier_config(
            workdir=str(tmp_path / name), init_from=workdir,
            finetune=C.FinetuneConfig(mode="lora", lora=C.LoraConfig(rank=4)),
            data=C.DataConfig(dataset="folder", path=_folder_data(tmp_path) if not (tmp_path / "reviews").exists()
                              else str(tmp_path / "reviews"), data_dir=str(tmp_path / "tfds"), eval_fraction=0.25),
            train=C.TrainConfig(steps=steps, batch_size=8, seq_len=32, log_every=1, eval_every=4, eval_batches=2,
                                progress_bar=False),
            checkpoint=C.CheckpointConfig(every=2, keep=3, async_save=False))
        records = []
        state = train.train(cfg, log=records.append)
        return cfg, state, records

    _, straight, straight_log = run("straight", 4)
    run("resumed", 2)
    cfg, resumed, resumed_log = run("resumed", 4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))
    assert [r["loss"] for r in resumed_log if r["step"] > 2] == [r["loss"] for r in straight_log if r["step"] > 2]
    final = straight_log[-1]
    assert set(final["eval_confusion"][0]) and 0.0 <= final["eval_macro_f1"] <= 1.0
    # The run's checkpoint holds only what trained: the adapters and the head.
    from_disk = ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir), read_only=True)
    state_meta = from_disk.restore_meta()
    from_disk.close()
    assert state_meta["config"]["init_from"] == workdir
    assert state_meta["config"]["data"]["classes"] == ["bad", "good", "meh"]  # kept with the run
    assert set(resumed.params) == {"head", "lora"}
    # The command line loads the run through the restore path (adapters merged) and classifies.
    capsys.readouterr()
    classify_cli.main(["--workdir", cfg.workdir, "--text", "great lovely fine", "--text", "awful dull"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r["probabilities"]) for r in lines] == [{"bad", "good", "meh"}] * 2
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-3 and r["class"] in r["probabilities"] for r in lines)


def test_lora_on_moe_expert_kernels_expert_parallel_equals_single_device(language_model, tmp_path):
    """Adapters on the experts' kernels shard over `expert` like the kernels themselves."""
    lm_cfg = dataclasses.replace(tiny_config(workdir=str(tmp_path / "moe_lm")),
                                 model=dataclasses.replace(tiny_config().model, moe=C.MoeConfig(num_experts=4, top_k=2)))
    s = train.setup(lm_cfg)
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(lm_cfg.workdir))
    writer.save(1, train.init_state(s, jax.random.key(5)), {"data_step": 1, "config": C.to_dict(lm_cfg)})
    writer.close()
    with open(tmp_path / "moe_lm" / "config.json", "w") as f:
        f.write(C.to_json(lm_cfg))
    lora_cfg = C.LoraConfig(rank=4, targets=(r"(^|/)attn/(q|v)$", r"(^|/)mlp/(gate|up|down)$"))
    cfg = classifier_config(model=lm_cfg.model, init_from=lm_cfg.workdir, mesh=C.MeshConfig(data=1, fsdp=2, expert=4),
                            finetune=C.FinetuneConfig(mode="lora", lora=lora_cfg))
    s8, state, history = _steps(cfg, jax.devices())
    b = state.params["lora"]["blocks/mlp/gate"]["b"]  # [layers, E, r, F]
    assert b.sharding.spec[1] == "expert" and b.addressable_shards[0].data.shape[1] == 1
    _, single_state, single = _steps(dataclasses.replace(cfg, mesh=C.MeshConfig(1, 1, 1, 1)), jax.devices()[:1])
    for got, want in zip(history, single):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 jax.device_get(state.params), jax.device_get(single_state.params))
