"""Datasets, result processing and filters of the embedded lm-eval tasks (the YAML files beside
this one name these functions with `!function loaders.NAME`): the JSONL files under data/, read
from this directory wherever the package is installed, with no download and no Hugging Face hub
lookup."""

from __future__ import annotations

import json
import os

import datasets

from jaxllm.knowledge import qa

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


def next_line_results(doc: dict, results: list) -> dict:
    """acc: the line is the greedy continuation; bits_per_byte: its negative log-likelihood in
    bits per UTF-8 byte (lm-eval's bits_per_byte aggregation of (log-likelihood, bytes) pairs)."""
    loglikelihood, is_greedy = results[0]
    return {"acc": int(is_greedy), "bits_per_byte": (loglikelihood, len(doc["target"].encode("utf-8")))}


def qa_answers(resps: list, docs: list) -> list:
    """The answer in each generated continuation, as `python -m jaxllm.qa` reads it (qa.answer_of:
    the first line without quotes, backticks and a final period)."""
    return [[qa.answer_of(r) for r in rs] for rs in resps]
