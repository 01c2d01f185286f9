"""Tests for jaxllm.labelled: labelled text from folders, JSONL, CSV, TFDS and the embedded
stdlib_packages task; deterministic classification batches; one-line errors."""

import collections
import csv
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxllm import data, labelled
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import ClassifierConfig, Config, ConfigError, DataConfig, ModelConfig, TrainConfig

B, E, P = data.BOS_ID, data.EOS_ID, data.PAD_ID
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# split -> [(text, class)]: the same small sentiment data in every format.
EXAMPLES = {
    "train": [("a great film", "pos"), ("dull and slow", "neg"), ("loved it ✓", "pos"),
              ("never again", "neg"), ("wonderful cast", "pos"), ("a mess", "neg"), ("fun", "pos")],
    "test": [("superb", "pos"), ("boring plot", "neg"), ("quite good\nreally", "pos")],
}
CLASSES = ("neg", "pos")


def config(data_cfg, num_classes=2, batch_size=4, seq_len=16, **data_overrides):
    return Config(data=dataclasses.replace(data_cfg, **data_overrides),
                  classifier=ClassifierConfig(num_classes=num_classes),
                  train=TrainConfig(batch_size=batch_size, seq_len=seq_len))


def write_folder(root, examples=EXAMPLES, split_dirs=True):
    for split, items in examples.items():
        for i, (text, label) in enumerate(items):
            path = root / (split if split_dirs else "") / label / f"{split}{i:03d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def mock_records(split, examples=EXAMPLES):
    return [{"text": text.encode(), "label": CLASSES.index(label)} for text, label in examples[split]]


def named_examples(cfg, split):
    names = labelled.class_names(cfg)
    return sorted((text, names[label]) for _, text, label in labelled.load_examples(cfg.data, split))


@pytest.fixture
def sources(tmp_path):
    """Configs of the same data as a folder, a JSONL file, a CSV file (integer labels) and TFDS."""
    rows = [(split, text, label) for split, items in EXAMPLES.items() for text, label in items]
    tfds_dir = str(tmp_path / "tfds")
    folder = write_folder(tmp_path / "folder")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y, "split": s} for s, t, y in rows])
    table = write_csv(tmp_path / "d.csv", [{"review": t, "stars": CLASSES.index(y), "split": s} for s, t, y in rows],
                      ["split", "review", "stars"])
    return {
        "folder": DataConfig(dataset="folder", path=str(folder), data_dir=tfds_dir, eval_split="test"),
        "jsonl": DataConfig(dataset="jsonl", path=str(jsonl), data_dir=tfds_dir, eval_split="test"),
        "csv": DataConfig(dataset="csv", path=str(table), data_dir=tfds_dir, text_feature="review",
                          label_feature="stars", classes=CLASSES, eval_split="test"),
        "tfds": DataConfig(dataset="imdb_reviews", data_dir=tfds_dir, eval_split="test"),
    }


def mocked_tfds():
    return tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kwargs: mock_records(split))


# ---------------------------------------------------------------------------------------------
# Sources


def test_folder_jsonl_csv_and_tfds_give_the_same_examples(sources):
    expected = {split: sorted(items) for split, items in EXAMPLES.items()}

    def check(name, cfg):
        assert labelled.class_names(cfg) == CLASSES, name
        for split in ("train", "test"):
            assert named_examples(cfg, split) == expected[split], (name, split)
        # The batches hold the same examples too.
        batch = labelled.LabelledBatches(cfg, "test", shuffle=False).global_batch(0)
        rows = zip(batch["inputs"], batch["labels"], batch["weights"])
        assert sorted((data.decode(x), CLASSES[y]) for x, y, w in rows if w) == expected["test"], name

    for name in ("folder", "jsonl", "csv"):
        check(name, config(sources[name], seq_len=64))
    with mocked_tfds():  # (TFDS builds nothing while mocked: local sources are built outside)
        check("tfds", config(sources["tfds"], seq_len=64))
    # JSONL and CSV keep the file's order.
    jsonl, table = (labelled.load_examples(sources[k], "train") for k in ("jsonl", "csv"))
    assert [e[1:] for e in jsonl] == [e[1:] for e in table] == [(t, CLASSES.index(y)) for t, y in EXAMPLES["train"]]
    assert "tensorflow" not in sys.modules


def test_local_sources_are_array_record_tfds_datasets(sources):
    labelled.class_names(config(sources["folder"]))
    base = os.path.join(sources["folder"].data_dir, "jaxllm_labelled_text")
    (config_name,) = os.listdir(base)
    source = tfds.data_source(f"jaxllm_labelled_text/{config_name}", split="test",
                              data_dir=sources["folder"].data_dir, download=False)
    assert sorted((r["text"].decode(), CLASSES[r["label"]]) for r in source) == sorted(EXAMPLES["test"])


def test_split_by_hash_without_split_folders_or_column(tmp_path):
    texts = [f"review number {i}" for i in range(40)]
    examples = {"all": [(t, CLASSES[i % 2]) for i, t in enumerate(texts)]}
    folder = write_folder(tmp_path / "f", examples, split_dirs=False)
    cfg = DataConfig(dataset="folder", path=str(folder), data_dir=str(tmp_path / "tfds"), eval_fraction=0.25)
    relpaths = sorted(os.path.join(y, f"all{i:03d}.txt") for i, (_, y) in enumerate(examples["all"]))
    expected = data.split_files(relpaths, 0.25)
    for split in ("train", "validation"):
        assert [k for k, _, _ in labelled.load_examples(cfg, split)] == expected[split]

    # JSONL: by the text, so a duplicated text never lands in both splits.
    rows = [{"text": t, "label": y} for t, y in examples["all"]] + [{"text": texts[0], "label": "pos"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(dataset="jsonl", path=str(jsonl), data_dir=str(tmp_path / "tfds"), eval_fraction=0.25)
    train, valid = ([t for _, t, _ in labelled.load_examples(cfg, s)] for s in ("train", "validation"))
    assert sorted(train + valid) == sorted(r["text"] for r in rows)
    assert not set(train) & set(valid) and 4 <= len(valid) <= 18
    assert set(valid) == set(data.split_files(sorted(set(texts)), 0.25)["validation"])


def test_integer_labels_without_classes_are_numbered_in_order(tmp_path):
    rows = [{"text": "x", "label": 10}, {"text": "y", "label": 2}, {"text": "z", "label": "2"}]
    cfg = DataConfig(dataset="jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                     data_dir=str(tmp_path / "tfds"), eval_fraction=0.0)
    assert labelled.class_names(config(cfg)) == ("2", "10")
    assert [y for _, _, y in labelled.load_examples(cfg, "train")] == [1, 0, 0]


def test_classes_fix_the_label_order(sources):
    cfg = config(sources["folder"], classes=("pos", "neg"))
    assert labelled.class_names(cfg) == ("pos", "neg")
    assert named_examples(cfg, "test") == sorted(EXAMPLES["test"])
    with mocked_tfds():  # a TFDS ClassLabel's names are mapped onto data.classes
        cfg = config(sources["tfds"], classes=("pos", "neg"))
        assert [y for _, _, y in labelled.load_examples(cfg.data, "test")] == [0, 1, 0]


def test_stdlib_packages_is_split_like_the_language_model_corpus(tmp_path):
    cfg = config(DataConfig(dataset="stdlib_packages", data_dir=str(tmp_path)), num_classes=8)
    names = labelled.class_names(cfg)
    assert len(names) == len(set(names)) == 8 and "email" in names
    root, files = data.stdlib_files()
    lm = data.split_files(files, DataConfig().eval_fraction)  # the LM's own split, same default
    sizes = collections.Counter()
    for rel in (f for f in lm["train"] if "/" in f):
        sizes[rel.split("/")[0]] += os.path.getsize(os.path.join(root, rel))
    assert set(names) == {p for p, _ in sizes.most_common(8)}  # packages (directories), by bytes

    by_split = {s: labelled.load_examples(cfg.data, s) for s in ("train", "validation")}
    for split in ("train", "validation"):  # so no validation snippet comes from a file the LM trained on
        assert {key.rsplit(":", 1)[0] for key, _, _ in by_split[split]} <= set(lm[split]), split
    counts = {s: collections.Counter(names[y] for _, _, y in ex) for s, ex in by_split.items()}
    assert all(counts["train"][n] >= 100 for n in names) and sum(counts["validation"].values()) >= 100

    # Snippets: consecutive pieces of their file, cut at line ends, labelled by its package.
    for key, text, label in by_split["validation"][::25]:
        rel, offset = key.rsplit(":", 1)
        with open(os.path.join(root, rel), "rb") as f:
            content = f.read()
        raw = text.encode()
        assert content[int(offset):int(offset) + len(raw)] == raw and names[label] == rel.split("/")[0]
        assert raw.endswith(b"\n") or int(offset) + len(raw) == len(content)
        assert len(raw) <= labelled.SNIPPET_BYTES or raw.count(b"\n") <= 1
        assert len(raw.split()) >= 5  # not mostly blank
    # data.classes picks the packages.
    picked = config(cfg.data, num_classes=2, classes=("json", "email"))
    assert labelled.class_names(picked) == ("json", "email")
    assert {k.split("/")[0] for k, _, _ in labelled.load_examples(picked.data, "train")} == {"json", "email"}


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_are_a_pure_function_of_seed_and_step_and_resume(sources):
    cfg = config(sources["jsonl"], batch_size=3)
    one = labelled.LabelledBatches(cfg, "train")
    uninterrupted = [one.global_batch(t) for t in range(10)]  # 7 examples: several epochs
    resumed = labelled.LabelledBatches(cfg, "train")
    for t in (9, 4, 5, 6):
        for k, v in resumed.global_batch(t).items():
            np.testing.assert_array_equal(v, uninterrupted[t][k])
    # Each epoch is a fresh permutation of all examples.
    n = one.num_examples
    seen = np.concatenate([one.examples(t, 0, 3) for t in range(10)])
    assert sorted(seen[:n]) == sorted(seen[n:2 * n]) == list(range(n))
    assert not np.array_equal(seen[:n], seen[n:2 * n])
    other = labelled.LabelledBatches(config(sources["jsonl"], batch_size=3, seed=1), "train")
    assert not np.array_equal(other.examples(0, 0, 3), one.examples(0, 0, 3))
    assert all((b["weights"] == 1).all() for b in uninterrupted)


def test_eval_batches_count_every_example_once(sources):
    cfg = config(sources["jsonl"], batch_size=4)
    batches = labelled.LabelledBatches(cfg, "train", shuffle=False)
    assert batches.num_examples == 7 and batches.num_batches == 2
    got = [batches.global_batch(t) for t in range(3)]
    weights = np.concatenate([b["weights"] for b in got])
    np.testing.assert_array_equal(weights, [1] * 7 + [0] * 5)  # the last batch filled; then nothing
    labels = np.concatenate([b["labels"] for b in got])[:7]
    np.testing.assert_array_equal(labels, [CLASSES.index(y) for _, y in EXAMPLES["train"]])
    assert (got[1]["segment_ids"][3] == 0).all() and (got[2]["segment_ids"] == 0).all()


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_local_batches_concatenate_to_the_global_batch(sources, process_count):
    batches = labelled.LabelledBatches(config(sources["jsonl"], batch_size=8), "train")
    for step in (0, 3):
        local = [batches.local_batch(step, p, process_count) for p in range(process_count)]
        for k, value in batches.global_batch(step).items():
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), value)
    with pytest.raises(ConfigError, match="divisible"):
        batches.local_batch(0, 0, 3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_places_tokens_and_positions(tmp_path, side):
    rows = [{"text": "ab", "label": "pos"}, {"text": "abcdefghij", "label": "neg"}]
    cfg = config(DataConfig(dataset="jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                            data_dir=str(tmp_path / "tfds"), eval_fraction=0.0, padding_side=side),
                 batch_size=2, seq_len=6)
    batch = labelled.LabelledBatches(cfg, "train", shuffle=False).global_batch(0)
    a, b = data.encode("ab")
    short = {"right": ([B, a, b, P, P, P], [1, 1, 1, 0, 0, 0], [0, 1, 2, 0, 0, 0]),
             "left": ([P, P, P, B, a, b], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2])}[side]
    for key, want in zip(("inputs", "segment_ids", "positions"), short):
        np.testing.assert_array_equal(batch[key][0], want)
    # Longer than seq_len: BOS and the text's start.
    np.testing.assert_array_equal(batch["inputs"][1], [B, *data.encode("abcde")])
    np.testing.assert_array_equal(batch["positions"][1], np.arange(6))
    np.testing.assert_array_equal(batch["labels"], [1, 0])
    for key, dtype, shape in [("inputs", np.int32, (2, 6)), ("segment_ids", np.int32, (2, 6)),
                              ("positions", np.int32, (2, 6)), ("labels", np.int32, (2,)),
                              ("weights", np.float32, (2,))]:
        assert batch[key].dtype == dtype and batch[key].shape == shape, key

    # A tokenizer without BOS or PAD: the text alone, padded with EOS.
    bare = dataclasses.replace(tokenizer_lib.BYTES, name="bare", bos_id=None, pad_id=None)
    row = labelled.LabelledBatches(cfg, "train", bare, shuffle=False).global_batch(0)["inputs"][0]
    np.testing.assert_array_equal(row, [a, b, E, E, E, E] if side == "right" else [E, E, E, E, a, b])


def test_hugging_face_tokenizer_and_caches(sources, monkeypatch):
    hf_dir = os.path.join(REPO, "tests", "fixtures", "hf", "llama")
    tok = tokenizer_lib.load(hf_dir)
    cfg = dataclasses.replace(config(sources["jsonl"], seq_len=32), model=ModelConfig(tokenizer=hf_dir))
    evaluation = labelled.eval_batches(cfg)
    batch = evaluation.global_batch(0)
    text, _ = EXAMPLES["test"][0]
    ids = [tok.bos_id, *tok.encode(text)]
    np.testing.assert_array_equal(batch["inputs"][0, :len(ids)], ids)
    assert (batch["inputs"][0, len(ids):] == tok.pad_or_eos).all()
    byte_batch = labelled.LabelledBatches(cfg, "test", shuffle=False).global_batch(0)
    assert byte_batch["inputs"][0, 1] == ord(text[0])  # its own cache, in byte ids

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt what was already prepared")

    train = labelled.train_batches(cfg)
    assert (train.split, train.shuffle, evaluation.split, evaluation.shuffle) == ("train", True, "test", False)
    assert train.class_names == CLASSES and train.global_batch(0)["inputs"].shape == (4, 32)

    monkeypatch.setattr(labelled.JaxllmLabelledText, "download_and_prepare", fail)
    monkeypatch.setattr(labelled, "_tokenize", fail)
    again = labelled.eval_batches(cfg).global_batch(0)
    for k in batch:
        np.testing.assert_array_equal(again[k], batch[k])
    np.testing.assert_array_equal(labelled.train_batches(cfg).global_batch(5)["inputs"], train.global_batch(5)["inputs"])


def test_a_changed_file_gets_its_own_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "old text", "label": "a"}])
    cfg = DataConfig(dataset="jsonl", path=str(path), data_dir=str(tmp_path / "tfds"), eval_fraction=0.0)
    assert labelled.load_examples(cfg, "train") == [("line1", "old text", 0)]
    write_jsonl(path, [{"text": "new longer text", "label": "b"}, {"text": "more", "label": "a"}])
    assert labelled.load_examples(cfg, "train") == [("line1", "new longer text", 1), ("line2", "more", 0)]


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_labels(sources, tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}]
    cfg = config(DataConfig(dataset="jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                            data_dir=str(tmp_path / "t"), classes=CLASSES))
    with pytest.raises(ConfigError, match=r"line2: unknown label 'meh'.*\['neg', 'pos'\]"):
        labelled.class_names(cfg)
    table = write_csv(tmp_path / "d.csv", [{"text": "a", "label": 5}], ["text", "label"])
    with pytest.raises(ConfigError, match="row2: unknown label '5'"):
        labelled.class_names(config(cfg.data, dataset="csv", path=str(table), eval_fraction=0.0))
    with pytest.raises(ConfigError, match=r"label\(s\) \['neg'\] not in data.classes=\['pos'\]"):
        labelled.class_names(config(sources["folder"], num_classes=1, classes=("pos",)))
    with mocked_tfds(), pytest.raises(ConfigError, match=r"\['pos'\] not in data.classes"):
        labelled.class_names(config(sources["tfds"], num_classes=2, classes=("neg", "bad")))


def test_empty_class_folder(sources):
    os.makedirs(os.path.join(sources["folder"].path, "test", "meh"))
    with pytest.raises(ConfigError, match=r"class folder .*test/meh is empty"):
        labelled.class_names(config(sources["folder"], num_classes=3))


def test_missing_path(tmp_path):
    for dataset in ("folder", "jsonl", "csv"):
        with pytest.raises(ConfigError, match=r"data.path='.*nowhere' does not exist"):
            labelled.class_names(config(DataConfig(dataset=dataset, path=str(tmp_path / "nowhere"))))
        with pytest.raises(ConfigError, match=f"data.dataset={dataset} needs data.path"):
            labelled.class_names(config(DataConfig(dataset=dataset)))


def test_num_classes_must_match_the_data(sources):
    with pytest.raises(ConfigError, match=r"classifier.num_classes=3 .* 2 classes \['neg', 'pos'\]: "
                                          r"set classifier.num_classes=2"):
        labelled.LabelledBatches(config(sources["folder"], num_classes=3), "train")


def test_tfds_dataset_without_the_features(sources):
    with mocked_tfds():
        for overrides, missing in [({"text_feature": "sentence"}, "text_feature='sentence'"),
                                   ({"label_feature": "stars"}, "label_feature='stars'")]:
            with pytest.raises(ConfigError, match=rf"no feature data.{missing}; its features: \['label', 'text'\]"):
                labelled.class_names(config(sources["tfds"], **overrides))
    lm1b = config(sources["tfds"], dataset="lm1b")  # text only
    with tfds.testing.mock_data(num_examples=2), pytest.raises(ConfigError, match=r"'lm1b' has no feature "
                                                                                  r"data.label_feature='label'"):
        labelled.class_names(lm1b)


def test_glue_sst2_as_the_experiment_reads_it(tmp_path):
    data_cfg = DataConfig(dataset="glue/sst2", text_feature="sentence", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=5):
        cfg = config(data_cfg, seq_len=32)
        assert labelled.class_names(cfg) == ("negative", "positive")
        batches = labelled.eval_batches(cfg)
        batch = batches.global_batch(1)
    assert batches.num_examples == 5 and batch["inputs"].shape == (4, 32)
    np.testing.assert_array_equal(batch["weights"], [1, 0, 0, 0])
    assert set(batch["labels"][:1]) <= {0, 1} and batch["inputs"][0, 0] == B


def test_other_configuration_errors(sources):
    with pytest.raises(ConfigError, match="has no split 'validation'.*splits: \\['test', 'train'\\]"):
        labelled.eval_batches(config(sources["folder"], eval_split="validation"))
    with pytest.raises(ConfigError, match="padding_side='middle'"):
        labelled.LabelledBatches(config(sources["folder"], padding_side="middle"), "train")
    with pytest.raises(ConfigError, match="'no_such_dataset_xyz' is not one of folder, jsonl, csv"):
        labelled.class_names(config(sources["folder"], dataset="no_such_dataset_xyz"))
