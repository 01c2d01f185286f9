"""Hugging Face BERT, RoBERTa, BertForSequenceClassification, RobertaForSequenceClassification
and GPT-2 in and out (interop/hf_encoders.py) against fixtures written by `transformers`
(tests/fixtures/make_hf_fixtures_encoders.py, make_hf_fixtures_encoders2.py): logits of a
96-token pair and of a padded row, GPT-2's cached greedy continuation, import -> export -> import,
per-shard reads on 8 devices equal to one device, one-line errors."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxllm import config as C
from jaxllm import labelled, restore, sharding
from jaxllm.cli.plan import load_experiment
from jaxllm.cli import hf as hf_cli
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.interop import hf, hf_encoders
from jaxllm.models import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf_encoders")
FIXTURES2 = os.path.join(ROOT, "tests", "fixtures", "hf_encoders2")  # make_hf_fixtures_encoders2.py


def golden(name):
    return dict(np.load(os.path.join(FIXTURES, name, "golden.npz")))


def imported(name, tmp_path, *overrides):
    workdir = str(tmp_path / f"{name}_run")
    hf_encoders.import_checkpoint(os.path.join(FIXTURES, name), workdir, C.override(C.Config(), list(overrides)))
    return workdir


def outputs(cfg, params, ref):
    """The model's logits on the golden inputs: padding is segment 0, positions count real tokens."""
    segments = ref["attention_mask"]
    positions = np.cumsum(segments, axis=1) * segments - segments
    model = MODELS.get(cfg.family).build(cfg)
    args = (ref["input_ids"], segments, positions)
    if cfg.family != "causal_lm":
        args += (ref["token_type_ids"],)
    return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args))


# BERT unscanned on a tensor-parallel mesh: the maps hold per block and per shard too.
@pytest.mark.parametrize("name,family,overrides", [
    ("bert", "masked_lm", ("model.scan_layers=false", "mesh.tensor=2")), ("roberta", "masked_lm", ()),
    ("bert_cls", "classifier", ()), ("gpt2", "causal_lm", ())])
def test_imported_logits_equal_the_reference(name, family, overrides, tmp_path):
    cfg, params = restore.load_params(imported(name, tmp_path, *overrides))
    assert cfg.family == family and ("block_1" in params) == bool(overrides)
    ref = golden(name)
    out = outputs(cfg, params, ref)
    if out.ndim == 3:  # token logits: the padded row's real tokens
        real = ref["attention_mask"].astype(bool)
        np.testing.assert_allclose(out[real], ref["logits"][real], atol=1e-4, rtol=0)
    else:
        np.testing.assert_allclose(out, ref["logits"], atol=1e-4, rtol=0)


def test_gpt2_cached_greedy_decoding_equals_the_reference_continuation(tmp_path):
    cfg, params = restore.load_params(imported("gpt2", tmp_path))
    ref = golden("gpt2")
    (tokens,) = Generator(cfg.model).generate(
        params, [ref["prompt_ids"][0].tolist()], SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False),
        jax.random.key(0))
    assert tokens == ref["greedy"][0].tolist()


@pytest.mark.parametrize("name", ["roberta", "bert_cls", "gpt2"])
def test_import_export_import_is_bit_identical(name, tmp_path):
    workdir = imported(name, tmp_path)
    out = str(tmp_path / "exported")
    hf_cli.main(["export", "--workdir", workdir, "--out", out])
    original, exported = hf.SafetensorsFiles(os.path.join(FIXTURES, name)), hf.SafetensorsFiles(out)
    assert set(exported.where) == set(original.where)
    for tensor in original.where:
        theirs, ours = original.read(tensor), exported.read(tensor)
        if name == "roberta" and tensor.endswith("position_embeddings.weight"):
            theirs, ours = theirs[2:], ours[2:]  # rows 0-1 belong to padding: written back as zeros
        np.testing.assert_array_equal(ours, theirs, err_msg=tensor)
    hf_config = json.load(open(os.path.join(out, "config.json")))
    reference = json.load(open(os.path.join(FIXTURES, name, "config.json")))
    for key in ("architectures", "max_position_embeddings", "n_positions", "type_vocab_size", "num_labels"):
        assert hf_config.get(key) == reference.get(key, hf_config.get(key)), key
    again = str(tmp_path / "again")
    hf_cli.main(["import", "--hf_dir", out, "--workdir", again])
    _, first = restore.load_params(workdir)
    _, second = restore.load_params(again)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(second))


def test_roberta_classifier_logits_and_round_trip(tmp_path):
    """RobertaForSequenceClassification: its head (dense, tanh, out_proj on <s>) is imported as
    BERT's pooler and score; logits equal transformers', and export writes RoBERTa's names back."""
    source = os.path.join(FIXTURES2, "roberta_cls")
    workdir = str(tmp_path / "run")
    hf_encoders.import_checkpoint(source, workdir)
    cfg, params = restore.load_params(workdir)
    assert cfg.family == "classifier" and cfg.classifier.pooler and cfg.classifier.score_bias
    ref = dict(np.load(os.path.join(source, "golden.npz")))
    np.testing.assert_allclose(outputs(cfg, params, ref), ref["logits"], atol=1e-4, rtol=0)
    out = str(tmp_path / "exported")
    hf_cli.main(["export", "--workdir", workdir, "--out", out])
    original, exported = hf.SafetensorsFiles(source), hf.SafetensorsFiles(out)
    assert set(exported.where) == set(original.where)
    for tensor in original.where:
        theirs, ours = original.read(tensor), exported.read(tensor)
        if tensor.endswith("position_embeddings.weight"):
            theirs, ours = theirs[2:], ours[2:]  # rows 0-1 belong to padding: written back as zeros
        np.testing.assert_array_equal(ours, theirs, err_msg=tensor)
    hf_config = json.load(open(os.path.join(out, "config.json")))
    assert hf_config["architectures"] == ["RobertaForSequenceClassification"]
    assert hf_config["num_labels"] == 3 and hf_config["max_position_embeddings"] == 130
    again = str(tmp_path / "again")
    hf_cli.main(["import", "--hf_dir", out, "--workdir", again])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(restore.load_params(again)[1]))


@pytest.mark.parametrize("name,sharded_tensor", [("bert", "bert.embeddings.word_embeddings.weight"),
                                                 ("gpt2", "transformer.h.0.attn.c_attn.weight")])
def test_sharded_import_reads_blocks_and_equals_one_device(name, sharded_tensor, monkeypatch):
    """Streaming reads: on 8 devices (fsdp 4 x tensor 2) each device reads only its block of a
    sharded tensor (never all of `sharded_tensor`'s rows), and the params equal a one-device import."""
    hf_dir = os.path.join(FIXTURES, name)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    arch = hf_encoders.architecture_of(config)
    cfg = hf_encoders.config_from_hf(config, hf_dir, C.Config())
    reads, rows = [], hf.SafetensorsFiles.rows

    def recording(self, tensor, index=None):
        view = rows(self, tensor, index)
        reads.append((tensor, view.shape[0], self.shape(tensor)[0]))
        return view

    monkeypatch.setattr(hf.SafetensorsFiles, "rows", recording)
    eight = hf_encoders.read_params(hf_dir, arch, config, cfg, sharding.make_mesh(C.MeshConfig(fsdp=4, tensor=2)))
    assert {n < total for tensor, n, total in reads if tensor == sharded_tensor} == {True}
    one = hf_encoders.read_params(hf_dir, arch, config, cfg,
                                  sharding.make_mesh(C.MeshConfig(fsdp=1), devices=jax.devices()[:1]))
    assert len(jax.tree.leaves(one)[0].sharding.device_set) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(eight), jax.device_get(one))


def test_unsupported_configs_and_missing_tensors_are_one_line_errors(tmp_path):
    hf_dir = str(tmp_path / "bert")
    shutil.copytree(os.path.join(FIXTURES, "bert"), hf_dir)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    json.dump({**config, "position_embedding_type": "relative_key"}, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(hf.HFError, match=r"position_embedding_type='relative_key' cannot be represented") as e:
        hf_encoders.import_checkpoint(hf_dir, str(tmp_path / "a"))
    assert "\n" not in str(e.value)
    json.dump({**config, "num_hidden_layers": 3}, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(hf.HFError, match=r"tensor bert.encoder.layer.2.attention.self.query.weight is not in"):
        hf_encoders.import_checkpoint(hf_dir, str(tmp_path / "b"))
    json.dump({**config, "hidden_size": 48}, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(hf.HFError, match=r"tensor bert.embeddings.word_embeddings.weight has shape \[320, 32\]"):
        hf_encoders.import_checkpoint(hf_dir, str(tmp_path / "c"))


def test_sst2_examples_for_an_imported_bert_are_cls_text_sep(tmp_path):
    """classify_sst2_bert's data with a BERT tokenizer (the fixture's WordPiece), SST-2 mocked."""
    cfg = load_experiment(os.path.join(ROOT, "experiments", "classify_sst2_bert.py")).get_config()
    model = dataclasses.replace(cfg.model, tokenizer=os.path.join(FIXTURES, "bert"), vocab_size=320)
    cfg = dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, data_dir=str(tmp_path)),
                              train=dataclasses.replace(cfg.train, batch_size=4, seq_len=16))
    with tfds.testing.mock_data(num_examples=6):
        batch = labelled.train_batches(cfg).global_batch(0)
    lengths = batch["segment_ids"].sum(1)
    assert (batch["inputs"][:, 0] == 2).all()  # [CLS]
    assert (batch["inputs"][np.arange(4), lengths - 1] == 3).all()  # [SEP], kept when the text is cut
    assert set(batch["labels"]) <= {0, 1}
