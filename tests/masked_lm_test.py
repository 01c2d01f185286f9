"""The masked-LM family (models/masked_lm.py, masking.py) and classifiers on an encoder: BERT's
masking rates and determinism, whole words, bidirectional attention, sharded equals single device,
and a classifier's encoder backbone filled from a masked-LM run (full, probe, LoRA)."""

import dataclasses

import jax
import numpy as np

from jaxllm import config as C
from jaxllm import masking
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.models import MODELS
from jaxllm.training import train
from helpers import save_fresh_run, tiny_config, two_train_steps

MLM = C.MaskedLMConfig()
SPECIALS = masking.special_ids(tokenizer_lib.BYTES)
ENCODER = dict(attention_kind="bidirectional", mlp_kind="gelu", mlp_bias=True, qkv_bias=True, attn_out_bias=True,
               norm_kind="layernorm", norm_placement="post", embed_norm=True, position_kind="learned",
               max_positions=32, type_vocab_size=2)


def encoder_config(**overrides) -> C.Config:
    cfg = tiny_config(family="masked_lm", opt=C.OptConfig(learning_rate=3e-3, warmup_steps=1))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_kv_heads=0, **ENCODER))
    return dataclasses.replace(cfg, **overrides)


def rows(seed=0, R=64, L=512):
    rng = np.random.default_rng(seed)
    text = rng.choice(np.frombuffer(b"abc de_f  g.(,)", np.uint8), (R, L)).astype(np.int32)
    text[:, 0], text[:, -9] = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
    segments = np.ones((R, L), np.int32)
    segments[:, -8:] = 0  # padding
    return text, segments


def masked(text, segments, seed=0, cfg=MLM, pieces=None):
    rngs = [np.random.default_rng((seed, r)) for r in range(len(text))]
    return masking.mask_tokens(text, segments, rngs, cfg, mask_id=tokenizer_lib.MASK_ID, random_ids=256,
                               specials=SPECIALS, pieces=pieces)


def test_bert_masking_rates_and_what_is_never_chosen():
    text, segments = rows()
    inputs, chosen = masked(text, segments)
    picked = chosen > 0
    maskable = (segments != 0) & ~np.isin(text, SPECIALS)
    assert not picked[~maskable].any() and (inputs[~picked] == text[~picked]).all()
    assert abs(picked.sum() / maskable.sum() - 0.15) < 0.01
    became_mask = inputs[picked] == tokenizer_lib.MASK_ID
    kept = inputs[picked] == text[picked]
    assert abs(became_mask.mean() - 0.8) < 0.02
    # Kept: 10%, plus the random draws that hit the token itself (1 in 256).
    assert abs(kept.mean() - 0.1) < 0.02 and abs((~became_mask & ~kept).mean() - 0.1) < 0.02
    assert (inputs[picked & (inputs != tokenizer_lib.MASK_ID)] < 256).all()
    again, _ = masked(text, segments)
    other, _ = masked(text, segments, seed=1)
    assert (again == inputs).all() and (other != inputs).any()


def test_whole_word_masking_chooses_every_piece_of_a_word():
    text, segments = rows(R=16, L=256)
    pieces = tuple(np.pad(t, (0, 400 - len(t))) for t in tokenizer_lib.BYTES.word_pieces())
    _, chosen = masked(text, segments, pieces=pieces)
    starts = masking.word_starts(text, segments, *pieces)
    word = np.cumsum(starts, axis=1)
    maskable = (segments != 0) & ~np.isin(text, SPECIALS)
    for r in range(len(text)):
        for w in np.unique(word[r][maskable[r]]):
            in_word = (word[r] == w) & maskable[r]
            assert len(set(chosen[r][in_word])) == 1  # all of the word, or none of it
    assert (starts.sum(1) < maskable.sum(1)).all()  # multi-byte words exist
    assert 0.1 < chosen.sum() / maskable.sum() < 0.2


def test_masked_batches_are_a_pure_function_of_step_and_row(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + some_value\n" * 20)
    data = C.DataConfig(dataset="text_files", text_files=str(tmp_path / "corpus" / "*.txt"),
                        data_dir=str(tmp_path / "tfds"), eval_fraction=0.3)
    cfg = dataclasses.replace(encoder_config(), data=data)
    train_a, train_b = masking.train_batches(cfg), masking.train_batches(cfg)
    whole = train_a.global_batch(3)
    halves = [train_b.batch_rows(3, 0, 4), train_b.local_batch(3, 1, 2)]
    for k, v in whole.items():
        np.testing.assert_array_equal(v, np.concatenate([h[k] for h in halves]), err_msg=k)
    assert not (whole["inputs"] == train_a.global_batch(4)["inputs"]).all()
    # Targets are the unmasked rows; the loss weighs exactly the chosen tokens.
    plain = train_a.tokens
    assert whole["weights"].sum() > 0 and set(np.unique(whole["weights"])) <= {0.0, 1.0}
    assert (whole["inputs"] != whole["targets"]).sum() <= whole["weights"].sum()
    assert ((whole["inputs"] != whole["targets"]) <= (whole["weights"] > 0)).all()
    assert set(np.unique(whole["targets"])) <= set(np.unique(plain))
    # Validation masking is fixed: the same batch from a fresh reader.
    first, second = masking.eval_batches(cfg).global_batch(0), masking.eval_batches(cfg).global_batch(0)
    jax.tree.map(np.testing.assert_array_equal, first, second)


def mlm_batch(k, batch_size=8, seq_len=32):
    text, segments = rows(seed=k, R=batch_size, L=seq_len)
    inputs, chosen = masked(text, segments, seed=k, cfg=C.MaskedLMConfig(rate=0.3))
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)) * (segments != 0)
    return {"inputs": inputs, "targets": text, "segment_ids": segments, "positions": positions.astype(np.int32),
            "weights": chosen}


def test_encoder_sees_later_tokens_and_a_sharded_step_equals_one_device():
    cfg = encoder_config(mesh=C.MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    _, state, history = two_train_steps(cfg, batch=mlm_batch)
    single = dataclasses.replace(cfg, mesh=C.MeshConfig(1, 1, 1, 1))
    _, single_state, single_history = two_train_steps(single, jax.devices()[:1], batch=mlm_batch)
    for got, want in zip(history, single_history):
        for name in ("loss", "grad_norm", "accuracy"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 jax.device_get(state.params), jax.device_get(single_state.params))
    # Bidirectional: changing the last real token changes the first position's logits.
    model, params = MODELS.get("masked_lm").build(cfg), jax.device_get(single_state.params)
    batch = mlm_batch(0)
    changed = batch["inputs"].copy()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    first = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])[:, 1]
    after = model.apply({"params": params}, changed, batch["segment_ids"], batch["positions"])[:, 1]
    assert np.abs(np.asarray(first - after)).max() > 1e-4


def test_an_encoder_classifier_starts_from_a_masked_lm_run_with_lora(tmp_path):
    source = encoder_config(workdir=str(tmp_path / "mlm"))
    mlm_params = jax.device_get(save_fresh_run(source, seed=3).params)
    cfg = dataclasses.replace(
        source, workdir=str(tmp_path / "cls"), family="classifier", init_from=source.workdir,
        classifier=C.ClassifierConfig(num_classes=3, backbone="encoder", pooling="first", pooler=True, score_bias=True),
        finetune=C.FinetuneConfig(mode="lora", lora=C.LoraConfig(targets=(r"(^|/)attn/(q|v)$",))))
    s = train.setup(cfg)
    state, _ = train.restore_or_init(s, None)
    backbone = train.initial_params(s, frozen_only=True)
    # The backbone is the masked-LM run without its MLM head.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(backbone),
                 {k: v for k, v in mlm_params.items() if k != "mlm_head"})
    assert set(state.params["head"]) | {"lora"} == {"pooler", "score", "score_bias", "lora"}
    assert state.params["lora"]  # adapters on the encoder's attention
