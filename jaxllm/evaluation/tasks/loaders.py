"""Datasets of the embedded lm-eval tasks (the YAML files beside this one name these functions with
`custom_dataset: !function loaders.NAME`): the JSONL files under data/, read from this directory
wherever the package is installed, with no download and no Hugging Face hub lookup."""

from __future__ import annotations

import json
import os

import datasets

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def read_jsonl(name: str) -> datasets.DatasetDict:
    with open(os.path.join(DATA_DIR, name)) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def stdlib_qa(**kwargs) -> datasets.DatasetDict:
    return read_jsonl("stdlib_qa.jsonl")


def stdlib_next_line(**kwargs) -> datasets.DatasetDict:
    return read_jsonl("stdlib_next_line.jsonl")


def stdlib_text(**kwargs) -> datasets.DatasetDict:
    return read_jsonl("stdlib_text.jsonl")
