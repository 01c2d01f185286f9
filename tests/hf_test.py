"""Hugging Face interop (interop/hf.py, interop/hf_config.py) against fixtures written by
`transformers` (tests/fixtures/make_hf_fixtures.py): tiny random Llama (untied), Llama 3 (tied, rope
scaling), Mistral (sliding window), Qwen2 (q/k/v biases, tied) and Mixtral (MoE), and
(tests/fixtures/make_hf_fixtures_modern.py) Qwen3 (q/k norms), Qwen3-MoE (fine-grained experts,
normalised top-k, dense and MoE blocks alternating), Gemma 3 (5 local : 1 global layers with their
own RoPE bases, sandwich norms, GeGLU, soft-capped logits) and Gemma 2 (soft-capped attention),
each in 2-6 safetensors shards, with the reference logits of an 80-token input and greedy
continuations."""

import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import restore, sharding
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.cli import generate as generate_cli
from jaxllm.cli import hf as hf_cli
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.interop import hf
from jaxllm.models import Transformer, causal_lm
from jaxllm.training import train

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("llama", "llama3", "mistral", "qwen2", "mixtral", "qwen3", "qwen3_moe", "gemma3", "gemma2")


def golden(name):
    return dict(np.load(os.path.join(FIXTURES, name, "golden.npz")))


def imported(name, tmp_path, *overrides):
    workdir = str(tmp_path / f"{name}_run")
    hf.import_checkpoint(os.path.join(FIXTURES, name), workdir, C.override(C.Config(), list(overrides)))
    return workdir


def logits_of(cfg, params, input_ids):
    return np.asarray(Transformer(cfg.model).apply({"params": params}, input_ids))


@pytest.mark.parametrize("name", FAMILIES)
def test_imported_logits_equal_the_reference(name, tmp_path):
    cfg, params = restore.load_params(imported(name, tmp_path))
    ref = golden(name)
    np.testing.assert_allclose(logits_of(cfg, params, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_unscanned_import_gives_the_same_logits(name, tmp_path):
    cfg, params = restore.load_params(imported(name, tmp_path, "model.scan_layers=false"))
    assert "block_1" in params and "blocks" not in params
    ref = golden(name)
    np.testing.assert_allclose(logits_of(cfg, params, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "mistral", "mixtral", "gemma3", "gemma2"])
def test_cached_greedy_decoding_equals_the_reference_continuation(name, tmp_path):
    cfg, params = restore.load_params(imported(name, tmp_path))
    ref = golden(name)
    prompt = ref["prompt_ids"][0].tolist()
    (tokens,) = Generator(cfg.model).generate(
        params, [prompt], SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False), jax.random.key(0))
    assert tokens == ref["greedy"][0].tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral", "qwen3_moe", "gemma3"])
def test_import_export_import_is_bit_identical(name, tmp_path):
    workdir = imported(name, tmp_path)
    out = str(tmp_path / "exported")
    report = hf.export_checkpoint(workdir, out, max_shard_bytes=200_000)
    assert report["shards"] >= 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    original, exported = hf.SafetensorsFiles(os.path.join(FIXTURES, name)), hf.SafetensorsFiles(out)
    tied = json.load(open(os.path.join(FIXTURES, name, "config.json"))).get("tie_word_embeddings")
    expected_names = {n for n in original.where if not (tied and n == "lm_head.weight")}
    assert set(exported.where) == expected_names
    for tensor in expected_names:
        np.testing.assert_array_equal(exported.read(tensor), original.read(tensor), err_msg=tensor)
    again = str(tmp_path / "again")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, file))
    hf.import_checkpoint(out, again)
    first_cfg, first = restore.load_params(workdir)
    second_cfg, second = restore.load_params(again)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(second))
    # The exported config.json describes the same model.
    assert second_cfg.model == dataclasses.replace(first_cfg.model, tokenizer=second_cfg.model.tokenizer)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_import_onto_an_8_device_mesh_equals_one_device(name):
    hf_dir = os.path.join(FIXTURES, name)
    base = C.Config(mesh=C.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    model = hf.model_config(json.load(open(os.path.join(hf_dir, "config.json"))), base=base.model)
    cfg = dataclasses.replace(base, model=model)
    many = hf.read_params(hf_dir, cfg, sharding.make_mesh(cfg.mesh))
    one = hf.read_params(hf_dir, cfg, sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1]))
    if name == "mixtral":
        gate = many["blocks"]["mlp"]["gate"]  # [layers, E, D, F]: experts over expert, D over fsdp, F over tensor
        assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
        assert gate.addressable_shards[0].data.shape == (2, 2, 32, 64)
    if name == "qwen3_moe":  # groups of a dense and an MoE block: the experts of block_1 split as Mixtral's
        gate = many["blocks"]["block_1"]["mlp"]["gate"]  # [groups, E, D, F]
        assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
        assert gate.addressable_shards[0].data.shape == (1, 4, 32, 16)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(many), jax.device_get(one))


# One process of a two-process import (4 CPU devices each, gloo over localhost): the mixtral
# fixture onto the 8-device mesh above; pickles {param path: [(shard index, data)]} of its own
# devices and the (tensor, rows) it mapped.
_IMPORT_WORKER = """
import dataclasses, json, os, pickle, sys
import jax
port, process_id, hf_dir, out = sys.argv[1:5]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id), initialization_timeout=60)
from jaxllm import config as C, sharding
from jaxllm.interop import hf
mapped, rows = [], hf.SafetensorsFiles.rows
hf.SafetensorsFiles.rows = lambda self, name, r=None: mapped.append((name, r and (r.start, r.stop))) or rows(self, name, r)
base = C.Config(mesh=C.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
cfg = dataclasses.replace(base, model=hf.model_config(json.load(open(os.path.join(hf_dir, "config.json"))), base=base.model))
params = hf.read_params(hf_dir, cfg, sharding.make_mesh(cfg.mesh))
shards = {"/".join(str(getattr(k, "key", k)) for k in path): [(s.index, jax.device_get(s.data)) for s in x.addressable_shards]
          for path, x in jax.tree_util.tree_leaves_with_path(params)}
pickle.dump({"shards": shards, "mapped": mapped, "devices": jax.local_device_count()}, open(out, "wb"))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_each_read_their_own_shards(tmp_path):
    """A multi-host import: each process holds the single-process import's values on its devices,
    and reads only the rows of the files that its devices hold (not all of every tensor)."""
    hf_dir = os.path.join(FIXTURES, "mixtral")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    outs = [str(tmp_path / f"process{i}.pkl") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _IMPORT_WORKER, str(port), str(i), hf_dir, outs[i]],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    base = C.Config(mesh=C.MeshConfig(1, 1, 1, 1))
    cfg = dataclasses.replace(base, model=hf.model_config(json.load(open(os.path.join(hf_dir, "config.json"))),
                                                          base=base.model))
    whole = jax.device_get(hf.read_params(hf_dir, cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])))
    whole = {"/".join(str(getattr(k, "key", k)) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(whole)}
    results = [pickle.load(open(out, "rb")) for out in outs]
    files = hf.SafetensorsFiles(hf_dir)
    for r in results:
        assert r["devices"] == 4 and set(r["shards"]) == set(whole)
        for path, shards in r["shards"].items():
            assert len(shards) == 4
            for index, data in shards:
                np.testing.assert_array_equal(data, whole[path][index], err_msg=path)
        # The experts' kernels are split between the processes: each maps only part of their rows.
        gate = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
        rows = {rng for name, rng in r["mapped"] if name == gate}
        assert rows and all(rng is not None and rng[1] - rng[0] < files.shape(gate)[0] for rng in rows), rows


def test_transposes_are_exact_for_every_layout(monkeypatch):
    """transpose_into's fast path (16/32-bit elements moved as 64-bit words, in blocks of 128 rows
    and a partial last one) and its fallbacks (odd shapes, 8-bit and 64-bit elements, strided rows,
    converting dtypes) all give x.T bit for bit."""
    fast_blocks = []
    real = hf._transpose_words
    monkeypatch.setattr(hf, "_transpose_words", lambda *a: fast_blocks.append(a[0].shape) or real(*a))
    rng = np.random.default_rng(0)
    for dtype in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64, np.int8):
        for shape in ((8, 4), (4, 8), (12, 20), (7, 3), (6, 10), (256, 1028), (260, 1028), (1, 1)):
            x = rng.standard_normal(shape).astype(dtype)
            for source in (x, x[:, 2:] if shape[1] > 4 else x, x[::2]):
                out = np.empty(source.shape[::-1], dtype)
                hf.transpose_into(source, out)
                np.testing.assert_array_equal(out.view(np.uint8), np.ascontiguousarray(source.T).view(np.uint8))
            converted = np.empty(shape[::-1], np.float32)
            hf.transpose_into(x, converted)
            np.testing.assert_array_equal(converted, x.T.astype(np.float32))
    # The fast path ran, on full blocks and on the 260-row matrices' partial last block (4 rows of
    # 64-bit words: 4 16-bit or 2 32-bit elements each).
    assert {(128, 1028 // 4), (4, 1028 // 4), (4, 1028 // 2)} <= set(fast_blocks)


def test_aligned_buffers_reach_a_cpu_device_without_a_copy():
    for shape in ((3, 5), (1024, 1024)):  # numpy-allocated and mapped
        host = hf.aligned_empty(shape, ml_dtypes.bfloat16)
        host[...] = 1
        assert jax.device_put(host, jax.devices()[0]).unsafe_buffer_pointer() == host.ctypes.data


def test_bfloat16_params_for_inference(tmp_path):
    cfg, params = restore.load_params(imported("llama", tmp_path, "model.param_dtype=bfloat16"))
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    ref = golden("llama")
    np.testing.assert_allclose(logits_of(cfg, params, ref["input_ids"]), ref["logits"], atol=0.1, rtol=0)


def test_the_tokenizer_and_the_commands(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    hf_cli.main(["import", "--hf_dir", os.path.join(FIXTURES, "qwen2"), "--workdir", workdir])
    assert json.loads(capsys.readouterr().out)["workdir"] == workdir
    cfg = restore.load_config(workdir)
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.vocab_size == 320
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok.encode(text)) == text
    generate_cli.main(["--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "5", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("def ")
    hf_cli.main(["export", "--workdir", workdir, "--out", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out)["architecture"] == "Qwen2ForCausalLM"


def _broken_copy(name, tmp_path, edit):
    directory = str(tmp_path / f"broken_{name}")
    shutil.copytree(os.path.join(FIXTURES, name), directory)
    edit(directory)
    return directory


def _overwrite_start(path, data: bytes):
    with open(path, "r+b") as f:
        f.write(data)


def _edit_config(**changes):
    def edit(directory):
        path = os.path.join(directory, "config.json")
        values = json.load(open(path))
        values.update(changes)
        json.dump(values, open(path, "w"))
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit_config(hidden_act="gelu"), "config.json hidden_act='gelu' cannot be represented"),
    (_edit_config(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}),
     "rope_scaling type 'dynamic' cannot be represented"),
    (_edit_config(intermediate_size=96), r"tensor model.layers.0.mlp.(gate|up|down)_proj.weight has shape "
                                         r"\[\d+, \d+\], but config.json implies \[\d+, \d+\]"),
    (lambda d: os.remove(os.path.join(d, "model-00002-of-00003.safetensors")),
     "shard model-00002-of-00003.safetensors listed in .* is missing"),
    (_edit_config(architectures=["T5ForConditionalGeneration"]), "jaxllm imports one of LlamaForCausalLM"),
    (_edit_config(model_type="mistral"), r"config.json model_type='mistral' disagrees with "
                                         r"architectures=\['LlamaForCausalLM'\] \(model_type 'llama'\)"),
    (lambda d: open(os.path.join(d, "config.json"), "w").write('{"architectures": ["LlamaForCausalLM"],'),
     r"broken_llama/config.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1"),
    (lambda d: os.truncate(os.path.join(d, "model-00001-of-00003.safetensors"),
                           os.path.getsize(os.path.join(d, "model-00001-of-00003.safetensors")) - 100),
     r"model-00001-of-00003.safetensors is truncated: tensor \S+ ends at byte \d+ of \d+"),
    (lambda d: _overwrite_start(os.path.join(d, "model-00001-of-00003.safetensors"), b"\xff" * 8),
     r"model-00001-of-00003.safetensors is not a readable safetensors file \(ValueError: a header of"),
    (lambda d: _overwrite_start(os.path.join(d, "model-00001-of-00003.safetensors"), b"\x10" + b"\0" * 7 + b"{not json"),
     r"model-00001-of-00003.safetensors is not a readable safetensors file \(JSONDecodeError"),
])
def test_what_cannot_be_imported_is_a_one_line_error(edit, message, tmp_path, capsys):
    hf_dir = _broken_copy("llama", tmp_path, edit)
    with pytest.raises(SystemExit) as error:
        hf_cli.main(["import", "--hf_dir", hf_dir, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_live_parity_with_transformers(tmp_path):
    """Only where `transformers` is installed (it is not part of the test install): the exported
    checkpoint loads with from_pretrained and gives jaxllm's logits."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    workdir = imported("mistral", tmp_path)
    out = str(tmp_path / "exported")
    hf.export_checkpoint(workdir, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ref = golden("mistral")
    with torch.no_grad():
        theirs = model(torch.tensor(ref["input_ids"], dtype=torch.long)).logits.numpy()
    cfg, params = restore.load_params(workdir)
    np.testing.assert_allclose(logits_of(cfg, params, ref["input_ids"]), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_the_transformers_4_config_layout_imports_the_same(name, tmp_path):
    """Hub checkpoints carry rope_theta / rope_scaling / torch_dtype at the top of config.json
    (transformers 4); transformers 5 writes rope_parameters. Both give the reference logits."""
    hf_dir = _broken_copy(name, tmp_path, lambda d: shutil.copyfile(os.path.join(d, "config.legacy.json"),
                                                                   os.path.join(d, "config.json")))
    workdir = str(tmp_path / "run")
    hf.import_checkpoint(hf_dir, workdir)
    cfg, params = restore.load_params(workdir)
    ref = golden(name)
    np.testing.assert_allclose(logits_of(cfg, params, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)


def _text_files(tmp_path) -> str:
    folder = tmp_path / "texts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "import", "class", "self", "value", "for", "in", "range", "print", "(", ")", ":"]
    for k in range(12):
        (folder / f"doc{k}.py").write_text(" ".join(rng.choice(words, 300)) + "\n")
    return str(folder / "*.py")


def test_finetuning_an_imported_model_on_text_with_its_tokenizer(tmp_path):
    """init_from starts training from the imported params; the data is tokenized with the model's
    tokenizer (BOS/EOS its own), and evaluation reports bits per byte through its token lengths."""
    source = imported("qwen2", tmp_path)
    cfg = restore.load_config(source)
    cfg = dataclasses.replace(
        cfg, workdir=str(tmp_path / "tuned"), init_from=source,
        data=C.DataConfig(dataset="text_files", text_files=_text_files(tmp_path), data_dir=str(tmp_path / "tfds"),
                          eval_fraction=0.25),
        train=C.TrainConfig(steps=2, batch_size=8, seq_len=32, log_every=1, eval_every=2, eval_batches=1,
                            progress_bar=False),
        opt=C.OptConfig(warmup_steps=1, learning_rate=1e-3),
        checkpoint=C.CheckpointConfig(every=0),
        mesh=C.MeshConfig(data=2, fsdp=4))
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    batches = causal_lm.batches(cfg, "train")
    first = batches.global_batch(0)
    assert first["inputs"].max() < tok.vocab_size and (first["inputs"] == tok.bos_id).any()
    assert (first["targets"] == tok.eos_id).any() or first["weights"].all()
    records = []
    train.train(cfg, log=records.append)
    # Step 1's loss is the imported model's own loss on batch 0.
    _, params = restore.load_params(source)
    logits = logits_of(cfg, params, first["inputs"])
    mask = first["weights"] > 0
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(log_probs, first["targets"][..., None], -1)[..., 0][mask].mean()
    np.testing.assert_allclose(records[0]["loss"], expected, rtol=2e-4)
    assert "bits_per_token" in records[0] and "bits_per_byte" not in records[0]
    final = records[-1]
    token_bytes = tok.token_bytes()
    assert 0 < final["eval_bits_per_byte"] < final["eval_loss"] / np.log(2)  # tokens are > 1 byte on average
    assert token_bytes[tok.bos_id] == 0 and token_bytes[tok.encode("return")].sum() == len("return")


def test_an_export_without_a_tokenizer_keeps_the_source_special_ids_and_length(tmp_path):
    """A checkpoint imported without tokenizer files runs on the byte tokenizer; its export still
    says the source's bos/eos/pad ids and max_position_embeddings, not the byte tokenizer's."""
    hf_dir = _broken_copy("qwen3", tmp_path, lambda d: [os.remove(os.path.join(d, f)) for f in hf.TOKENIZER_FILES
                                                       if os.path.exists(os.path.join(d, f))])
    workdir = str(tmp_path / "run")
    hf.import_checkpoint(hf_dir, workdir)
    assert restore.load_config(workdir).model.tokenizer == "bytes"
    out = str(tmp_path / "exported")
    hf.export_checkpoint(workdir, out)
    source, exported = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_dir, out))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert exported[key] == source[key], key
    assert (source["bos_token_id"], source["max_position_embeddings"]) == (1, 256)


def test_gemma3s_transformers_4_layout_and_pattern_fields_give_the_same_config():
    """Gemma 3 on the Hub (transformers 4): rope_theta, rope_local_base_freq and
    sliding_window_pattern instead of rope_parameters per layer type and layer_types."""
    new = json.load(open(os.path.join(FIXTURES, "gemma3", "config.json")))
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    old.update(rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=6)
    assert hf.model_config(old) == hf.model_config(new)
    cfg = hf.model_config(new)
    assert cfg.attention_pattern == ("sliding_window",) * 5 + ("causal",) and cfg.rope_thetas == (1e4,) * 5 + (0.0,)
    # 26 layers (Gemma 3 1B) are not whole periods of 6: imported unscanned.
    assert not hf.model_config({**new, "num_hidden_layers": 26, "layer_types": None}).scan_layers


@pytest.mark.parametrize("name, change, message", [
    ("llama", dict(norm_kind="layernorm"), r"model.norm_kind differ\(s\) from LlamaForCausalLM's recipe"),
    ("gemma3", dict(mlp_kind="swiglu"), r"not a Gemma3: model.mlp_kind differ\(s\)"),
    ("gemma3", dict(rope_thetas=(1e4, 2e4, 1e4, 1e4, 1e4, 0.0)), r"not a Gemma3: model.rope_thetas"),
    ("qwen3_moe", dict(moe=C.MoeConfig(num_experts=8, num_shared=1)), r"not a Qwen3Moe: model.moe.num_shared"),
])
def test_a_recipe_without_a_hugging_face_counterpart_is_refused_on_export(name, change, message):
    cfg = dataclasses.replace(hf.model_config(json.load(open(os.path.join(FIXTURES, name, "config.json")))), **change)
    with pytest.raises(hf.HFError, match=message):
        hf.hf_architecture(cfg)
