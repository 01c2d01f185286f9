"""Image data: the embedded digits task, image folders, JSONL, TFDS datasets without TensorFlow,
clear errors for bad images, and the generate command with --image."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jaxllm import config as C
from jaxllm import images
from jaxllm.cli import generate as generate_cli
from jaxllm.training import train

from helpers import save_fresh_run
from vlm_test import VISION, late_fusion_config, vlm_config


def _png(path, size=8, mode="L", value=None):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    array = rng.integers(0, 256, shape).astype(np.uint8) if value is None else np.full(shape, value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array, mode).save(path)
    return array


def test_digits_split_by_image_and_answers():
    train_set = images.image_set(C.DataConfig(dataset="digits"), "train")
    valid_set = images.image_set(C.DataConfig(dataset="digits"), "validation")
    n_questions = len(images.DIGIT_QUESTIONS)
    assert len(train_set.examples) + len(valid_set.examples) == 1797 * n_questions
    assert len(valid_set.examples) == 359 * n_questions
    named = [e for e in valid_set.examples if e.prompt == images.NAME_QUESTION]
    assert len(named) == 359 and {e.answer for e in named} == set(images.DIGIT_NAMES)
    assert all(e.label == -1 for e in named)  # naming is not a yes/no question: late fusion leaves it out
    even = [e for e in valid_set.examples if e.prompt == "is it even?"]
    assert all(e.answer == images.YES_NO[e.label] for e in even)


def test_image_folder_jsonl_and_late_fusion_batches(tmp_path):
    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            for k in range(3):
                _png(tmp_path / "pets" / split / label / f"{k}.png", size=12)
    cfg = late_fusion_config(data=C.DataConfig(dataset="image_folder", path=str(tmp_path / "pets")))
    assert train.MODELS.get("late_fusion").finalize(cfg).data.classes == ("cat", "dog")
    batches = images.batches(cfg, "eval", "late_fusion")
    batch = batches.global_batch(0)
    assert batch["images"].shape == (8, 8, 8, 1)  # 12x12 files resized to vision.image_size
    assert batch["weights"].tolist() == [1.0] * 6 + [0.0] * 2 and batch["labels"][:6].tolist() == [0, 0, 0, 1, 1, 1]
    # JSONL: image paths relative to the file, prompt + answer, labels by name.
    lines = []
    for k in range(6):
        _png(tmp_path / "shots" / f"{k}.png")
        lines.append({"image": f"shots/{k}.png", "prompt": "colour?", "answer": "grey", "label": ["no", "yes"][k % 2],
                      "split": "train" if k < 4 else "validation"})
    (tmp_path / "shots.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    cfg = vlm_config(data=C.DataConfig(dataset="image_jsonl", path=str(tmp_path / "shots.jsonl")))
    found = images.image_set(cfg.data, "validation")
    assert found.names == ("no", "yes") and [e.label for e in found.examples] == [0, 1]
    batch = images.batches(cfg, "eval", "vlm").global_batch(0)
    text = bytes(int(t) for t in batch["inputs"][0, 1:int(batch["prefix"][0].sum())]).decode()
    assert text == "colour?"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "text": "x"}\n{"image": "b.png"\n')
    with pytest.raises(C.ConfigError, match=r"bad.jsonl:2: not a JSON object"):
        images.image_set(dataclasses.replace(cfg.data, path=str(tmp_path / "bad.jsonl")), "train")


def test_tfds_image_dataset_without_tensorflow(tmp_path):
    cfg = vlm_config(data=C.DataConfig(dataset="mnist", eval_split="test", data_dir=str(tmp_path)))
    with tfds.testing.mock_data(num_examples=10):
        batch = images.batches(cfg, "train", "vlm").global_batch(0)
        assert batch["images"].shape == (8, 8, 8, 1)  # mnist's 28x28 resized
        answer = bytes(int(t) for t, w in zip(batch["targets"][0], batch["weights"][0]) if w and t < 256).decode()
        assert answer in [str(d) for d in range(10)]
    assert "tensorflow" not in sys.modules


def test_bad_images_are_clear_errors(tmp_path):
    v = VISION
    _png(tmp_path / "rgb.png", mode="RGB")
    with pytest.raises(C.ConfigError, match=r"has 3 channel\(s\) but vision.channels=1"):
        images.load_image(str(tmp_path / "rgb.png"), v)
    _png(tmp_path / "big.png", size=16)
    with pytest.raises(C.ConfigError, match=r"is 16x16 but vision.image_size=8; resize it or set data.resize_images=true"):
        images.load_image(str(tmp_path / "big.png"), v, resize=False)
    assert images.load_image(str(tmp_path / "big.png"), v).shape == (8, 8, 1)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(C.ConfigError, match=r"cannot read image .*broken.png"):
        images.load_image(str(tmp_path / "broken.png"), v)
    with pytest.raises(C.ConfigError, match=r"images of shape \(2, 16, 16, 1\), the vision tower takes \[batch, 8, 8, 1\]"):
        cfg = vlm_config()
        model = train.MODELS.get("vlm").build(cfg)
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((2, 16, 16, 1), np.float32),
                       *train.MODELS.get("vlm").init_inputs(cfg)[1:])


def test_generate_command_answers_about_an_image(tmp_path, capsys):
    cfg = vlm_config(workdir=str(tmp_path / "run"))
    save_fresh_run(cfg)
    _png(tmp_path / "digit.png", size=8)
    argv = ["--workdir", cfg.workdir, "--prompt", "what digit is this?", "--temperature", "0", "--max_new_tokens", "4"]
    generate_cli.main(argv + ["--image", str(tmp_path / "digit.png")])
    assert capsys.readouterr().out.startswith("what digit is this?")
    with pytest.raises(SystemExit):
        generate_cli.main(argv)
    assert "is a vlm run: give it --image FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(argv + ["--image", str(tmp_path / "missing.png")])
    assert "cannot read image" in capsys.readouterr().err


def test_augmentation_is_a_pure_function_of_seed_step_and_row():
    plain = vlm_config()
    augmented = dataclasses.replace(plain, data=dataclasses.replace(plain.data, augment_shift=1, augment_rotate=10.0))
    train_plain = images.batches(plain, "train", "vlm")
    train_aug, again = images.batches(augmented, "train", "vlm"), images.batches(augmented, "train", "vlm")
    a, b = train_aug.global_batch(3), again.global_batch(3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # The same examples and text, new views of the images (inside the picture: zero fill).
    p = train_plain.global_batch(3)
    for key in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(a[key], p[key])
    assert not np.allclose(a["images"], p["images"])
    # Each process's rows are the global batch's rows.
    second_half = train_aug.local_batch(3, process_index=1, process_count=2)
    np.testing.assert_array_equal(second_half["images"], a["images"][len(a["images"]) // 2:])
    # Evaluation images are never augmented.
    np.testing.assert_array_equal(images.batches(augmented, "eval", "vlm").global_batch(0)["images"],
                                  images.batches(plain, "eval", "vlm").global_batch(0)["images"])
    with pytest.raises(C.ConfigError, match="augment_shift=8 would move images of 8 pixels"):
        images.batches(dataclasses.replace(plain, data=dataclasses.replace(plain.data, augment_shift=8)), "train", "vlm")
    with pytest.raises(C.ConfigError, match="augment_shift=-1"):
        images.batches(dataclasses.replace(plain, data=dataclasses.replace(plain.data, augment_shift=-1)), "train", "vlm")


@pytest.mark.parametrize("text_feature", ["caption", "entities/label"])  # a text, a nested sequence of texts
def test_tfds_image_text_dataset_without_tensorflow(tmp_path, text_feature):
    cfg = vlm_config(vision=dataclasses.replace(VISION, channels=3),
                     data=C.DataConfig(dataset="ai2dcaption", text_feature=text_feature, eval_split="", data_dir=str(tmp_path)))
    with tfds.testing.mock_data(num_examples=4):
        found = images.image_set(cfg.data, "train")
        record = found.examples.source[1]
        want = record["caption"] if text_feature == "caption" else record["entities"]["label"][0]
        assert found.examples[1].answer == (want.decode() if isinstance(want, bytes) else want)
        batch = images.batches(cfg, "train", "vlm").global_batch(0)
    assert batch["images"].shape == (8, 8, 8, 3)
    assert batch["weights"].sum() > 0
    assert "tensorflow" not in sys.modules
