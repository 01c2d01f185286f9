"""Images with text for the vision families ("vlm", "late_fusion"): sources, decoding and
deterministic batches.

Sources (DataConfig.dataset); an example is (image, prompt, answer, label):
  "digits"        the embedded task: scikit-learn's bundled UCI handwritten digits (1,797 8x8
                  images, no download), each asked "what digit is this?" (answer "seven"), "is it
                  even?" and "is it greater than four?" ("yes"/"no", the labels of late fusion).
                  Split by image: a fixed 20% of the images (seed 0) is the validation split.
  "image_folder"  `data.path` holds one subfolder of image files per class (answer: the class
                  name), or train/ and validation/ (or test/) folders that each hold them;
                  otherwise files split by a hash of their relative path with data.eval_fraction.
  "image_jsonl"   `data.path` is a file of records {"image": file relative to it, "text": caption}
                  or {"image", "prompt", "answer"}, optionally "label" (a class name or index into
                  data.classes) and "split"; otherwise split by a hash of the image path.
  anything else   a TFDS dataset prepared under data_dir (mnist, cifar10, ...) read without
                  TensorFlow: data.image_feature, and a ClassLabel data.label_feature (answer: its
                  name) or a text feature data.text_feature (the answer; a slash path such as
                  "captions/text" reaches a nested one, and of several captions the first is used).

Pillow decodes image files (every common format, no TensorFlow) and resizes them to
vision.image_size (bilinear) unless data.resize_images=False; the channel count must be the tower's
(palettes are expanded and alpha dropped first). Pixels are scaled to [0, 1] and normalised with
vision.mean and vision.std. Training images may be augmented (data.augment_shift whole pixels,
data.augment_rotate degrees, drawn per row from (seed, step, row)). Batch t is a pure function of
(seed, t), as for labelled text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import sklearn.datasets

from jaxllm import data, labelled
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config, ConfigError, DataConfig, VisionConfig
from jaxllm.tokenizer import Tokenizer

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAME_QUESTION = "what digit is this?"
YES_NO = ("no", "yes")
# The digits task's questions: (prompt, answer of digit d, label of digit d (-1: not a yes/no question)).
DIGIT_QUESTIONS: tuple[tuple[str, Callable[[int], str], Callable[[int], int]], ...] = (
    (NAME_QUESTION, lambda d: DIGIT_NAMES[d], lambda d: -1),
    ("is it even?", lambda d: YES_NO[d % 2 == 0], lambda d: int(d % 2 == 0)),
    ("is it greater than four?", lambda d: YES_NO[d > 4], lambda d: int(d > 4)),
)
DIGITS_EVAL_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Example:
    image: Any  # uint8 array [H, W(, C)], or the path of an image file
    prompt: str
    answer: str
    label: int  # index into the source's class names; -1 where it has none


@dataclasses.dataclass(frozen=True)
class ImageSet:
    names: tuple[str, ...]  # class names (labels index them); () when the source has none
    examples: Sequence[Example]

    def labelled(self) -> Sequence[Example]:
        """The examples that have a label. A TFDS dataset's records all have one or none, so it is
        not read (and its images not decoded) to find out."""
        if isinstance(self.examples, _TfdsExamples):
            return self.examples if self.examples.label else []
        return [e for e in self.examples if e.label >= 0]


# ---------------------------------------------------------------------------------------------
# Decoding


def to_channels(array: np.ndarray, channels: int, where: str) -> np.ndarray:
    """[H, W, C] uint8 with C = `channels`, or a clear error."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] != channels:
        found = array.shape[-1] if array.ndim == 3 else f"shape {array.shape}"
        raise ConfigError(f"image {where} has {found} channel(s) but vision.channels={channels}; convert the "
                          "images or set vision.channels")
    return array


def fit(array: np.ndarray, v: VisionConfig, resize: bool, where: str) -> np.ndarray:
    """A uint8 [H, W, C] image at the tower's size: resized (bilinear), or a clear error."""
    array = to_channels(np.asarray(array), v.channels, where)
    if array.shape[:2] == (v.image_size, v.image_size):
        return array.astype(np.uint8)
    if not resize:
        raise ConfigError(f"image {where} is {array.shape[1]}x{array.shape[0]} but vision.image_size="
                          f"{v.image_size}; resize it or set data.resize_images=true")
    img = PIL.Image.fromarray(array[..., 0] if v.channels == 1 else array.astype(np.uint8))
    resized = np.asarray(img.resize((v.image_size, v.image_size), PIL.Image.Resampling.BILINEAR))
    return to_channels(resized, v.channels, where)


def load_image(path: str, v: VisionConfig, resize: bool = True) -> np.ndarray:
    """An image file decoded by Pillow as uint8 [I, I, C] (palettes expanded, alpha dropped)."""
    try:
        with PIL.Image.open(path) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("RGBA", "LA"):
                img = img.convert(img.mode[:-1])
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB" if img.mode in ("CMYK", "YCbCr", "HSV") else "L")
            array = np.asarray(img)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ConfigError(f"cannot read image {path!r}: {e}") from None
    return fit(array, v, resize, repr(path))


def augment(image: np.ndarray, rng: np.random.Generator, max_shift: int, max_degrees: float) -> np.ndarray:
    """uint8 [I, I, C] translated by whole pixels (zero fill: no resampling, so the pixels stay
    sharp like the evaluation images') and rotated about its centre (bilinear), by uniform random
    amounts up to the maxima: new views of each training image keep a ViT from memorising them."""
    if max_degrees > 0:
        img = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        degrees = rng.uniform(-max_degrees, max_degrees)
        image = np.asarray(img.rotate(degrees, PIL.Image.Resampling.BILINEAR, fillcolor=0)).reshape(image.shape)
    if max_shift > 0:
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        moved = np.zeros_like(image)
        H, W = image.shape[:2]
        moved[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
            image[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
        image = moved
    return image


def normalise(images_BIIC: np.ndarray, v: VisionConfig) -> np.ndarray:
    """uint8 pixels to float32 (x / 255 - mean) / std."""
    mean, std = np.asarray(v.mean, np.float32), np.asarray(v.std, np.float32)
    return ((images_BIIC.astype(np.float32) / 255.0) - mean) / std


# ---------------------------------------------------------------------------------------------
# Sources


def _digits(cfg: DataConfig, split: str) -> ImageSet:
    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(images))
    num_eval = int(round(len(images) * DIGITS_EVAL_FRACTION))
    chosen = np.sort(order[:num_eval] if split in ("validation", "test") else order[num_eval:])
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"the digits dataset has splits train and validation (or test), not {split!r}")
    examples = [Example(images[i], prompt, answer(int(digits.target[i])), label(int(digits.target[i])))
                for i in chosen for prompt, answer, label in DIGIT_QUESTIONS]
    return ImageSet(YES_NO, examples)


def _image_files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), folder)
                  for root, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))


def _image_folder(cfg: DataConfig, split: str) -> ImageSet:
    root = labelled.require_path(cfg, "folder", "images")
    subdirs = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    split_dirs = {"train", "validation", "test"} & set(subdirs)
    if split_dirs:
        folder = os.path.join(root, split)
        if split not in split_dirs:
            raise ConfigError(f"data.path={cfg.path!r} has no {split}/ folder (it has {sorted(split_dirs)})")
        every_file = files = _image_files(folder)
    else:
        folder = root
        every_file = _image_files(root)
        files = data.split_files(every_file, cfg.eval_fraction).get("train" if split == "train" else "validation", [])
    found = sorted({os.path.normpath(f).split(os.sep)[0] for f in every_file if os.sep in f})
    names, index = labelled.class_index(found, cfg.classes, f"data.path={cfg.path!r}")
    examples = [Example(os.path.join(folder, f), "", name, index[name])
                for f in files if os.sep in f for name in [os.path.normpath(f).split(os.sep)[0]]]
    return ImageSet(names, examples)


def _image_jsonl(cfg: DataConfig, split: str) -> ImageSet:
    path = labelled.require_path(cfg, "file", "images")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{cfg.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict) or "image" not in record or not ({"text", "answer"} & set(record)):
                raise ConfigError(f"{where}: a record needs \"image\" and \"text\" (or \"prompt\" and \"answer\")")
            records.append((where, record))
    if any("split" in r for _, r in records):
        chosen = [(w, r) for w, r in records if r.get("split") == split]
    else:
        held_out = set(data.split_files([r["image"] for _, r in records], cfg.eval_fraction).get("validation", []))
        chosen = [(w, r) for w, r in records if (r["image"] in held_out) == (split != "train")]
    labels = [str(r["label"]) for _, r in records if "label" in r]
    names = labelled.class_index(labels, cfg.classes, f"data.path={cfg.path!r}")[0] if labels else tuple(cfg.classes)
    base = os.path.dirname(path)
    examples = [Example(os.path.join(base, r["image"]), str(r.get("prompt", "")), str(r.get("answer", r.get("text", ""))),
                        labelled.label_index(r["label"], names, w) if "label" in r else -1)
                for w, r in chosen]
    return ImageSet(names, examples)


class _TfdsExamples(Sequence):
    """A TFDS data source's records as Examples, decoded on access."""

    def __init__(self, source, image: str, text: str | None, label: str | None, names: tuple[str, ...]):
        self.source, self.image, self.text, self.label, self.names = source, image, text, label, names

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):  # the data source raises ValueError, not IndexError, past its end
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Example:
        record = self.source[int(i)]
        label = int(record[self.label]) if self.label else -1
        if self.text:
            text = _field(record, self.text)
            if isinstance(text, (list, np.ndarray)) and np.ndim(text):  # several captions: the first
                text = text[0] if len(text) else b""
            answer = data.as_bytes(text).decode("utf-8", errors="replace")
        else:
            answer = self.names[label]
        return Example(np.asarray(record[self.image]), "", answer, label)


def _field(tree, path: str):
    """The value (or feature) at a slash path: coco_captions' captions are "captions/text"."""
    for part in path.split("/"):
        tree = getattr(tree, "feature", tree)  # a tfds Sequence feature holds its element's features
        if not hasattr(tree, "keys") or part not in tree.keys():
            return None
        tree = tree[part]
    return tree


def _named(cfg: DataConfig, split: str) -> ImageSet:
    data_dir = data.resolve_data_dir(cfg)
    builder = data.named_builder(cfg, data_dir, tuple(SOURCES))
    source, _ = data.named_source(cfg, split, data_dir, feature_key="image_feature", builder=builder)
    features = builder.info.features
    label = cfg.label_feature if cfg.label_feature in features else None
    text = cfg.text_feature if _field(features, cfg.text_feature) is not None else None
    if text is None and label is None:
        raise ConfigError(f"TFDS dataset {cfg.dataset!r} has neither data.label_feature={cfg.label_feature!r} nor "
                          f"data.text_feature={cfg.text_feature!r}; its features: {sorted(features.keys())}")
    names = tuple(getattr(features[label], "names", ())) if label else ()
    if label and not names:
        if not cfg.classes:
            raise ConfigError(f"TFDS dataset {cfg.dataset!r}: feature {label!r} is not a ClassLabel; name its "
                              "classes with data.classes=a,b,...")
        names = tuple(cfg.classes)
    return ImageSet(names, _TfdsExamples(source, cfg.image_feature, text, label, names))


SOURCES: dict[str, Callable[[DataConfig, str], ImageSet]] = {
    "digits": _digits, "image_folder": _image_folder, "image_jsonl": _image_jsonl}


def image_set(cfg: DataConfig, split: str) -> ImageSet:
    return SOURCES.get(cfg.dataset, _named)(cfg, split)


# ---------------------------------------------------------------------------------------------
# Batches


class ImageBatches(labelled.ExampleBatches):
    """Deterministic batches of one split: images float32 [B, I, I, C] and the text of each
    example, in the family's format.

    "vlm": inputs, targets, segment_ids, positions int32 [B, L] with text = [BOS] prompt answer
    [EOS] (truncated to L = seq_len, right-padded), prefix int32 [B, L] (1 on BOS and the prompt:
    the bidirectional part) and weights float32 [B, L] (1 where the target is an answer token or
    EOS: the loss is on the answer only).
    "late_fusion": inputs, segment_ids, positions [B, L] with text = [BOS] prompt, labels int32
    [B] and weights float32 [B]; examples without a label are left out."""

    def __init__(self, cfg: Config, split: str, layout: str, tokenizer: Tokenizer, shuffle: bool):
        t = cfg.train
        self.vision, self.seq_len, self.layout = cfg.vision, t.seq_len, layout
        self.resize, self.blank = cfg.data.resize_images, cfg.data.blank_images
        d = cfg.data
        if d.augment_shift < 0 or d.augment_rotate < 0:
            raise ConfigError(f"data.augment_shift={d.augment_shift} and data.augment_rotate={d.augment_rotate} "
                              "must be >= 0 (0 turns augmentation off)")
        if d.augment_shift >= cfg.vision.image_size:
            raise ConfigError(f"data.augment_shift={d.augment_shift} would move images of {cfg.vision.image_size} "
                              "pixels out of the picture; use a shift below vision.image_size")
        self.augmenting = shuffle and (d.augment_shift > 0 or d.augment_rotate > 0)
        self.max_shift, self.max_degrees = d.augment_shift, d.augment_rotate
        self.tok = tokenizer
        found = image_set(cfg.data, split)
        self.class_names = found.names
        self.items = found.examples
        if layout == "late_fusion":
            self.items = found.labelled()
        if not len(self.items):
            raise ConfigError(f"{cfg.data.dataset}[{split}] has no examples" +
                              (" with a label" if layout == "late_fusion" else ""))
        super().__init__(len(self.items), t.batch_size, cfg.data.seed, shuffle)

    def image(self, example: Example, where: str) -> np.ndarray:
        if isinstance(example.image, str):
            return load_image(example.image, self.vision, self.resize)
        return fit(example.image, self.vision, self.resize, where)

    def batch_rows(self, step: int, lo: int, hi: int) -> dict:
        return self.pack(self.examples(step, lo, hi), step, lo)

    def pack(self, indices: np.ndarray, step: int, lo: int) -> dict:
        """Rows of example `indices`, which are rows lo.. of batch `step` (augmentation draws from both)."""
        R, L, v = len(indices), self.seq_len, self.vision
        pad = self.tok.pad_or_eos
        bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
        eos = [] if self.tok.eos_id is None else [self.tok.eos_id]
        pixels = np.zeros((R, v.image_size, v.image_size, v.channels), np.uint8)
        out = {"inputs": np.full((R, L), pad, np.int32), "segment_ids": np.zeros((R, L), np.int32),
               "positions": np.zeros((R, L), np.int32)}
        if self.layout == "vlm":
            out.update(targets=np.full((R, L), pad, np.int32), prefix=np.zeros((R, L), np.int32),
                       weights=np.zeros((R, L), np.float32))
        else:
            out.update(labels=np.zeros(R, np.int32), weights=np.zeros(R, np.float32))
        for r, i in enumerate(indices):
            if i < 0:
                continue
            e = self.items[i]
            if not self.blank:
                pixels[r] = self.image(e, f"{i} of the dataset")
                if self.augmenting:
                    rng = np.random.default_rng((self.seed, step, lo + r))
                    pixels[r] = augment(pixels[r], rng, self.max_shift, self.max_degrees)
            prompt = bos + self.tok.encode(e.prompt).tolist()
            if self.layout == "vlm":
                row = (prompt + self.tok.encode(e.answer).tolist() + eos)[:L + 1]
                n = len(row) - 1
                out["inputs"][r, :n], out["targets"][r, :n] = row[:-1], row[1:]
                out["prefix"][r, :min(len(prompt), n)] = 1
                out["weights"][r, max(len(prompt) - 1, 0):n] = 1.0
            else:
                row = prompt[:L]
                n = len(row)
                out["inputs"][r, :n] = row
                out["labels"][r], out["weights"][r] = e.label, 1.0
            out["segment_ids"][r, :n], out["positions"][r, :n] = 1, np.arange(n)
        out["images"] = normalise(pixels, v)
        return out


def batches(cfg: Config, split: str, layout: str) -> ImageBatches:
    """The "train" (shuffled, epoch after epoch) or "eval" (in order) batches of a vision family."""
    d = cfg.data
    if split != "train" and not d.eval_split:
        raise ConfigError("data.eval_split is empty (evaluation off); set it to a split to evaluate on")
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    name = d.train_split if split == "train" else d.eval_split
    return ImageBatches(cfg, name, layout, tok, shuffle=split == "train")
