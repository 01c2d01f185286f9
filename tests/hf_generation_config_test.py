"""What serving stacks (transformers' generate, vLLM's LLM(model=dir)) read from an export besides
the weights: generation_config.json (bos, eos, pad) and the chat template."""

import json
import os
import shutil

import pytest

from jaxllm.interop import hf
from helpers import save_fresh_run, tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _chat_source(tmp_path):
    """The llama fixture with a chat template in tokenizer_config.json, one in
    chat_template.jinja (transformers >= 4.50) and an eos list in generation_config.json."""
    hf_dir = str(tmp_path / "source")
    shutil.copytree(os.path.join(FIXTURES, "llama"), hf_dir)
    for name, update in (("tokenizer_config.json", {"chat_template": TEMPLATE}),
                         ("generation_config.json", {"eos_token_id": [2, 1], "temperature": 0.6})):
        path = os.path.join(hf_dir, name)
        with open(path) as f:
            content = json.load(f)
        with open(path, "w") as f:
            json.dump({**content, **update}, f)
    with open(os.path.join(hf_dir, "chat_template.jinja"), "w") as f:
        f.write(TEMPLATE)
    return hf_dir


def _exported(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
    hf.import_checkpoint(_chat_source(tmp_path), workdir)
    hf.export_checkpoint(workdir, out)
    return out


def _read(directory, name):
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


def test_export_writes_the_generation_config_and_keeps_the_chat_template(tmp_path):
    out = _exported(tmp_path)
    generation = _read(out, "generation_config.json")
    # The source's eos list and sampling default win; pad and bos are the tokenizer's (<pad>, <s>).
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, [2, 1], 0)
    assert generation["temperature"] == 0.6
    assert _read(out, "tokenizer_config.json")["chat_template"] == TEMPLATE
    with open(os.path.join(out, "chat_template.jinja")) as f:
        assert f.read() == TEMPLATE

    # A run trained from scratch on bytes has no source: its generation config is its tokenizer's.
    cfg = tiny_config(workdir=str(tmp_path / "scratch"))
    save_fresh_run(cfg)
    scratch_out = str(tmp_path / "scratch_exported")
    hf.export_checkpoint(cfg.workdir, scratch_out)
    config, generation = _read(scratch_out, "config.json"), _read(scratch_out, "generation_config.json")
    assert generation == {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert None not in generation.values()


def test_transformers_loads_the_export_with_its_generation_config_and_chat_template(tmp_path):
    """Only where `transformers` is installed (it is not part of the test install)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    out = _exported(tmp_path)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, [2, 1], 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == [2, 1] and model.generation_config.pad_token_id == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<s>user: hi</s>"
