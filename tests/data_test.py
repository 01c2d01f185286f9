"""Tests for jaxllm.data: tokenizer, the TF-less TFDS sources, packing and deterministic batches."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxllm import data
from jaxllm.config import Config, ConfigError, DataConfig, TrainConfig

B, E, P = data.BOS_ID, data.EOS_ID, data.PAD_ID

FILES = {
    "a.txt": "alpha\n",
    "b.txt": "bravo bravo\n",
    "c.txt": "charlie: héllo wörld ✓ 日本\n",
    "sub/d.txt": "delta " * 30,
    "sub/e.txt": "echo",
    "sub/deeper/f.txt": "foxtrot\n" * 5,
    "g.txt": "golf",
    "h.txt": "hotel\n" * 3,
    "i.txt": "india",
    "j.txt": "juliett",
    "k.txt": "kilo " * 11,
    "l.txt": "lima",
}


def write_corpus(root, files=FILES):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return str(root / "**" / "*.txt")


@pytest.fixture
def corpus_cfg(tmp_path):
    pattern = write_corpus(tmp_path / "corpus")
    return DataConfig(
        dataset="text_files", text_files=pattern, data_dir=str(tmp_path / "tfds"), eval_fraction=0.3
    )


def all_documents(cfg):
    return [*data.load_documents(cfg, "train"), *data.load_documents(cfg, "validation")]


def expected_stream(texts):
    return np.concatenate([[B, *data.encode(t), E] for t in texts]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_encode_decode_round_trip():
    text = "def f(x):\n    return 'héllo wörld ✓ 日本 🙂'\n"
    ids = data.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # multi-byte characters
    assert data.decode(ids) == text
    assert data.NUM_TOKEN_IDS == 259 and {B, E, P} == {256, 257, 258}
    # A command-line argument with bytes that are not UTF-8 arrives surrogate-escaped.
    assert data.encode("caf\udce9").tolist() == [99, 97, 102, 0xE9]


def test_decode_drops_special_ids_and_replaces_bad_utf8():
    ids = [B, *data.encode("ab"), E, P, P, 300, -1]
    assert data.decode(np.array(ids)) == "ab"
    assert data.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"


# ---------------------------------------------------------------------------------------------
# Local text files through the TFDS builder


def test_text_files_built_as_array_record_and_read_back(corpus_cfg):
    train = data.load_documents(corpus_cfg, "train")
    valid = data.load_documents(corpus_cfg, "validation")
    # Every file is a document of exactly one split.
    assert sorted([*train, *valid]) == sorted(FILES.values())
    assert len(train) + len(valid) == len(FILES) and len(valid) >= 1 and len(train) >= 1

    # Array_record files in the data dir, readable by plain TFDS (no jaxllm code, no TensorFlow).
    base = os.path.join(corpus_cfg.data_dir, "jaxllm_text_files")
    (config_name,) = os.listdir(base)
    version_dir = os.path.join(base, config_name, "1.0.0")
    assert any(".array_record-" in f for f in os.listdir(version_dir))
    source = tfds.data_source(
        f"jaxllm_text_files/{config_name}", split="validation", data_dir=corpus_cfg.data_dir,
        download=False,
    )
    assert [r["text"].decode() for r in source] == list(valid)
    assert "tensorflow" not in sys.modules


def test_split_is_deterministic_disjoint_and_complete(corpus_cfg, tmp_path):
    splits = data.split_files(sorted(FILES), 0.3)
    assert splits == data.split_files(sorted(FILES, reverse=True), 0.3)
    assert sorted(splits["train"] + splits["validation"]) == sorted(FILES)
    assert not set(splits["train"]) & set(splits["validation"])
    # A file's split depends only on its own path: adding files moves no existing file.
    more = data.split_files(sorted(FILES) + [f"new{i}.txt" for i in range(20)], 0.3)
    assert set(splits["validation"]) <= set(more["validation"])
    # The built dataset follows it, and a second build elsewhere gives the same documents.
    by_text = {text: rel for rel, text in FILES.items()}
    valid = data.load_documents(corpus_cfg, "validation")
    assert sorted(by_text[t] for t in valid) == splits["validation"]
    other = DataConfig(**{**corpus_cfg.__dict__, "data_dir": str(tmp_path / "other")})
    assert list(data.load_documents(other, "validation")) == list(valid)


def test_second_use_reuses_built_dataset_and_token_cache(corpus_cfg, monkeypatch):
    first = data.Batches(corpus_cfg, "train", seq_len=16, batch_size=4)
    files = [
        os.path.join(d, f) for d, _, fs in os.walk(corpus_cfg.data_dir) for f in fs
        if ".array_record-" in f or f.startswith("jaxllm_tokens-")
    ]
    assert len(files) >= 3  # two splits' records and the train token cache
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a dataset that was already prepared")

    monkeypatch.setattr(data.JaxllmTextFiles, "download_and_prepare", fail)
    monkeypatch.setattr(data, "_write_stream", fail)
    second = data.Batches(corpus_cfg, "train", seq_len=16, batch_size=4)
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes
    np.testing.assert_array_equal(second.tokens, first.tokens)


def test_changed_files_get_their_own_dataset(corpus_cfg, tmp_path):
    assert "alpha\n" in all_documents(corpus_cfg)
    (tmp_path / "corpus" / "a.txt").write_text("ALPHA CHANGED\n")
    (tmp_path / "corpus" / "m.txt").write_text("mike")
    after = all_documents(corpus_cfg)
    assert "ALPHA CHANGED\n" in after and "mike" in after and "alpha\n" not in after
    assert len(os.listdir(os.path.join(corpus_cfg.data_dir, "jaxllm_text_files"))) == 2


def test_concurrent_builds_are_safe(corpus_cfg):
    script = textwrap.dedent(f"""
        from jaxllm import data
        from jaxllm.config import DataConfig
        cfg = DataConfig(dataset="text_files", text_files={corpus_cfg.text_files!r},
                         data_dir={corpus_cfg.data_dir!r}, eval_fraction=0.3)
        b = data.Batches(cfg, "train", seq_len=8, batch_size=2)
        print("TOKENS", b.num_tokens, list(data.load_documents(cfg, "validation")))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = {next(l for l in out.splitlines() if l.startswith("TOKENS")) for out, _ in outputs}
    assert len(results) == 1
    (config_name,) = os.listdir(os.path.join(corpus_cfg.data_dir, "jaxllm_text_files"))
    config_dir = os.path.join(corpus_cfg.data_dir, "jaxllm_text_files", config_name)
    assert os.listdir(config_dir) == ["1.0.0"]  # no leftover incomplete.* build dirs


def test_python_stdlib_corpus(tmp_path):
    root, files = data.stdlib_files()
    assert "os.py" in files and "json/decoder.py" in files
    assert not [f for f in files if f.split("/")[0] in ("test", "site-packages")]
    assert not [f for f in files if "/tests/" in f or os.path.basename(f).startswith("test_")]
    cfg = DataConfig(data_dir=str(tmp_path))  # dataset="python_stdlib" is the default
    train, valid = data.Batches(cfg, "train", 256, 8), data.Batches(cfg, "validation", 256, 8)
    assert train.num_documents + valid.num_documents == len(files)
    assert 0.01 < valid.num_documents / len(files) < 0.15
    assert 8e6 < train.num_tokens + valid.num_tokens < 3e7
    assert "def " in data.decode(train.global_batch(0)["inputs"])


# ---------------------------------------------------------------------------------------------
# Packing


def test_packing_at_a_document_boundary(tmp_path):
    write_corpus(tmp_path / "c", {"a.txt": "ab", "b.txt": "cde"})
    cfg = DataConfig(
        dataset="text_files", text_files=str(tmp_path / "c" / "*.txt"),
        data_dir=str(tmp_path / "tfds"), eval_fraction=0.0,
    )
    batches = data.Batches(cfg, "train", seq_len=6, batch_size=2, shuffle=False)
    # Stream: [B a b E B c d e E] (9 tokens) -> rows cover [0:7] and [6:13] (padded).
    assert batches.num_rows == 2
    batch = batches.global_batch(0)
    a, b_, c, d, e = data.encode("abcde")
    np.testing.assert_array_equal(batch["inputs"], [[B, a, b_, E, B, c], [d, e, E, P, P, P]])
    np.testing.assert_array_equal(batch["targets"], [[a, b_, E, B, c, d], [e, E, P, P, P, P]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]])
    for k, dtype in [("inputs", np.int32), ("segment_ids", np.int32), ("weights", np.float32)]:
        assert batch[k].dtype == dtype and batch[k].shape == (2, 6)


def test_rows_reproduce_the_stream_and_never_cross_documents(corpus_cfg):
    seq_len = 16
    batches = data.Batches(corpus_cfg, "train", seq_len, batch_size=4, shuffle=False)
    docs = data.load_documents(corpus_cfg, "train")
    stream = expected_stream(docs)
    rows = data.pack_rows(batches.tokens, batches.starts, np.arange(batches.num_rows), seq_len)
    flat = rows["inputs"].reshape(-1)
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    assert (flat[len(stream):] == P).all()
    np.testing.assert_array_equal(rows["targets"][:, :-1], rows["inputs"][:, 1:])
    np.testing.assert_array_equal(rows["targets"][:-1, -1], rows["inputs"][1:, 0])
    # Loss only where the next token is in the same document.
    inputs, weights = rows["inputs"], rows["weights"]
    np.testing.assert_array_equal(weights, ((inputs != E) & (inputs != P)).astype(np.float32))
    # Segments and positions restart at each BOS and at the row start.
    restart = np.zeros_like(inputs, bool)
    restart[:, 0] = True
    restart |= inputs == B
    real = inputs != P
    seg, pos = rows["segment_ids"], rows["positions"]
    np.testing.assert_array_equal(seg, np.where(real, np.cumsum(restart, axis=1), 0))
    assert (pos[restart] == 0).all()
    inner = ~restart[:, 1:] & real[:, 1:]
    np.testing.assert_array_equal(pos[:, 1:][inner], pos[:, :-1][inner] + 1)


# ---------------------------------------------------------------------------------------------
# Deterministic batches


def test_batches_are_a_pure_function_of_seed_and_step(corpus_cfg):
    one = data.Batches(corpus_cfg, "train", seq_len=8, batch_size=4)
    two = data.Batches(corpus_cfg, "train", seq_len=8, batch_size=4)
    for step in (0, 3, 1000):  # 1000 is many epochs later
        b1, b2 = one.global_batch(step), two.global_batch(step)
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k])
    assert not np.array_equal(one.global_batch(0)["inputs"], one.global_batch(1)["inputs"])
    other = data.Batches(DataConfig(**{**corpus_cfg.__dict__, "seed": 1}), "train", 8, 4)
    assert not np.array_equal(one.rows(0), other.rows(0))


def test_each_epoch_is_a_permutation_of_all_rows(corpus_cfg):
    batches = data.Batches(corpus_cfg, "train", seq_len=8, batch_size=4)
    n = batches.num_rows
    steps = -(-2 * n // 4) + 1
    seen = np.concatenate([batches.rows(t) for t in range(steps)])
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n : 2 * n]) == list(range(n))
    assert not np.array_equal(seen[:n], seen[n : 2 * n])  # reshuffled each epoch


def test_eval_batches_take_rows_in_order_and_wrap(corpus_cfg):
    batches = data.Batches(corpus_cfg, "validation", seq_len=4, batch_size=3, shuffle=False)
    n = batches.num_rows
    for k in range(n + 2):
        np.testing.assert_array_equal(batches.rows(k), np.arange(3 * k, 3 * k + 3) % n)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_local_batches_concatenate_to_the_global_batch(corpus_cfg, process_count):
    batches = data.Batches(corpus_cfg, "train", seq_len=8, batch_size=8)
    for step in (0, 5):
        local = [batches.local_batch(step, p, process_count) for p in range(process_count)]
        for k, value in batches.global_batch(step).items():
            assert local[0][k].shape == (8 // process_count, 8)
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), value)
    with pytest.raises(ConfigError, match="divisible"):
        batches.local_batch(0, 0, 3)


def test_train_and_eval_batches_from_config(corpus_cfg):
    cfg = Config(data=corpus_cfg, train=TrainConfig(batch_size=4, seq_len=8))
    train, evaluation = data.train_batches(cfg), data.eval_batches(cfg)
    assert (train.split, train.shuffle, evaluation.split, evaluation.shuffle) == (
        "train", True, "validation", False
    )
    for batches in (train, evaluation):
        assert batches.global_batch(0)["inputs"].shape == (4, 8)


# ---------------------------------------------------------------------------------------------
# Named TFDS datasets and errors


def test_named_tfds_dataset_with_mock_data(tmp_path):
    cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=6):
        docs = data.load_documents(cfg, "train")
        assert len(docs) == 6 and all(isinstance(d, str) for d in docs)
        batches = data.Batches(cfg, "train", seq_len=32, batch_size=4)
        raw = docs.raw(range(6))
    np.testing.assert_array_equal(
        batches.tokens, np.concatenate([[B, *np.frombuffer(r, np.uint8), E] for r in raw])
    )
    assert batches.num_documents == 6
    assert batches.global_batch(0)["inputs"].shape == (4, 32)
    assert not os.listdir(tmp_path)  # nothing cached for a mocked dataset
    assert "tensorflow" not in sys.modules


def test_missing_text_feature_lists_the_features(tmp_path):
    cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path), text_feature="content")
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ConfigError, match=r"'content'.*available features: \['text'\]"):
            data.load_documents(cfg, "train")


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        data.Batches(cfg, "train", seq_len=8, batch_size=2)
    message = str(info.value)
    assert "'lm1b' is not prepared" in message and str(tmp_path) in message
    assert "tfds build lm1b" in message and "array_record" in message


def test_unknown_dataset_name(tmp_path):
    cfg = DataConfig(dataset="no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="no_such_dataset_xyz.*" + str(tmp_path)):
        data.load_documents(cfg, "train")


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.nope")
    cfg = DataConfig(dataset="text_files", text_files=pattern, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.text_files=.*\*\.nope.* matches no files"):
        data.Batches(cfg, "train", seq_len=8, batch_size=2)
    with pytest.raises(ConfigError, match="needs data.text_files"):
        data.load_documents(DataConfig(dataset="text_files"), "train")


def test_single_file_needs_eval_fraction_zero(tmp_path):
    pattern = write_corpus(tmp_path / "c", {"only.txt": "just one document"})
    cfg = DataConfig(dataset="text_files", text_files=pattern, data_dir=str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="eval_fraction=0"):
        data.load_documents(cfg, "train")
    cfg = DataConfig(**{**cfg.__dict__, "eval_fraction": 0.0})
    assert list(data.load_documents(cfg, "train")) == ["just one document"]
    with pytest.raises(ConfigError, match="no split 'validation'"):
        data.load_documents(cfg, "validation")
