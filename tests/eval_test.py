"""lm-evaluation-harness integration: the jaxllm model class's scores are the model's own token
log-probs, whatever the batching; generate_until is greedy decoding cut at its stop strings; an
ensemble of one scores alike; the command's errors are one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance

from jaxllm import config as C
from jaxllm import data
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.cli import eval as eval_cli
from jaxllm.evaluation import harness, runner
from jaxllm.interop import hf
from jaxllm.models import Transformer
from helpers import save_fresh_run, tiny_config

BUFFER = 40  # one fixed-length buffer: one compilation for every reference forward pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval") / "run")
    cfg = tiny_config(workdir=workdir)  # seq_len 32: max_length 32, rows on the 8 test devices
    state = save_fresh_run(cfg)
    return workdir, cfg, jax.device_get(state.params)


@pytest.fixture(scope="module")
def lm(run):
    return harness.JaxllmLM(run[0], batch_size=3)


@pytest.fixture(scope="module")
def logits_fn(run):
    """Unsharded params and a plain forward pass over one fixed-length buffer."""
    _, cfg, params = run
    return jax.jit(lambda tokens: Transformer(cfg.model).apply({"params": params}, tokens))


def reference_log_probs(logits_fn):
    """log_softmax of a plain forward pass: the log-prob of each token of a sequence given the
    ones before it, and all the log-probs."""

    def log_probs(tokens):
        buffer = np.full((1, BUFFER), data.PAD_ID, np.int32)
        buffer[0, :len(tokens)] = tokens
        logp = np.asarray(jax.nn.log_softmax(logits_fn(buffer)[0].astype(jnp.float32), axis=-1))
        return np.array([logp[i - 1, tokens[i]] for i in range(1, len(tokens))]), logp

    return log_probs


def ll_request(context, continuation):
    return Instance("loglikelihood", {}, (context, continuation), 0)


REQUESTS = [("def f(x):\n    return ", "x + 1"), ("import o", "s"), ("", "hello"),
            ("class A:\n    pass\n", "\nclass B(A):"), ("# a comment", " spanning")]


def test_loglikelihood_is_the_models_token_log_probs_whatever_the_batching(run, lm, logits_fn):
    workdir = run[0]
    log_probs = reference_log_probs(logits_fn)
    got = lm.loglikelihood([ll_request(*r) for r in REQUESTS], disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(REQUESTS, got):
        tokens = [data.BOS_ID] + list(data.encode(context + continuation))
        per_token, full = log_probs(tokens)
        # lm-eval moves a context's trailing spaces to the continuation (_encode_pair).
        n = len(continuation.encode()) + len(context) - len(context.rstrip())
        np.testing.assert_allclose(logp, per_token[-n:].sum(), rtol=1e-5, atol=1e-5)
        assert greedy == all(np.argmax(full[i - 1]) == tokens[i] for i in range(len(tokens) - n, len(tokens)))
    # One request a call, and all in one padded call of a longer bucket: the same scores.
    one_by_one = harness.JaxllmLM(workdir, batch_size=1, runs=lm.runs)
    singles = [one_by_one.loglikelihood([ll_request(*r)], disable_tqdm=True)[0] for r in REQUESTS]
    together = harness.JaxllmLM(workdir, batch_size=8, runs=lm.runs).loglikelihood(
        [ll_request(*r) for r in REQUESTS], disable_tqdm=True)
    for a, b, c in zip(got, singles, together):
        np.testing.assert_allclose([a[0], b[0]], [c[0], c[0]], rtol=1e-5, atol=1e-5)
        assert a[1] == b[1] == c[1]


def test_loglikelihood_rolling_is_the_sum_over_the_text(lm, logits_fn):
    log_probs = reference_log_probs(logits_fn)
    short, long = "x = [1, 2, 3]\n", "for i in range(10):\n    print(i * i)\n" * 2  # 76 bytes: 3 windows
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in (short, long)],
                                   disable_tqdm=True)
    np.testing.assert_allclose(got[0], log_probs([data.BOS_ID, *data.encode(short)])[0].sum(), rtol=1e-5)
    windows = lm_utils.get_rolling_token_windows(list(data.encode(long)), data.BOS_ID, lm.max_length, 1)
    expected = sum(log_probs(list(c) + list(t))[0][-len(t):].sum()
                   for c, t in map(lm_utils.make_disjoint_window, windows))
    np.testing.assert_allclose(got[1], expected, rtol=1e-5)
    assert len(list(lm_utils.get_rolling_token_windows(list(data.encode(long)), data.BOS_ID, lm.max_length, 1))) == 3


def greedy_text(logits_fn, context, n):
    """Greedy decoding by full recompute: n tokens after BOS + context, cut after EOS."""
    seq = [data.BOS_ID, *data.encode(context)]
    for _ in range(n):
        buffer = np.full((1, BUFFER), data.PAD_ID, np.int32)
        buffer[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(logits_fn(buffer)[0, len(seq) - 1])))
        if seq[-1] == data.EOS_ID:
            break
    return data.decode(seq[len(context) + 1:])


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(lm, logits_fn):
    contexts = ["def main():\n", "x = ", "import sys"]
    expected = [greedy_text(logits_fn, c, 12) for c in contexts]
    assert len(expected[0]) >= 8  # room for the stop strings below
    got = lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 12}), 0)
                             for c in contexts], disable_tqdm=True)
    assert got == expected
    # Stop at a string inside the first text, and at the earliest of several.
    stop = expected[0][3:5]
    requests = [Instance("generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, (contexts[0], {"until": [expected[0][6:], stop[0]],
                                                              "max_gen_toks": 12}), 0)]
    cut = lm.generate_until(requests, disable_tqdm=True)
    assert cut[0] == expected[0][:expected[0].index(stop)] and stop not in cut[0]
    assert cut[1] == expected[0][:expected[0].index(stop[0])]


def test_an_ensemble_of_one_scores_alike(run, lm):
    ensemble = harness.JaxllmLM(run[0], batch_size=3, ensemble=True)
    assert len(ensemble.runs.workdirs) == 1 and ensemble.runs.rule == "mean_prob"
    requests = [ll_request(*r) for r in REQUESTS]
    for a, b in zip(lm.loglikelihood(requests, disable_tqdm=True), ensemble.loglikelihood(requests, disable_tqdm=True)):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
        assert a[1] == b[1]


LOCAL_TASK = """task: local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_the_command_evaluates_embedded_and_local_tasks_and_writes_json(run, capsys, tmp_path):
    """An embedded task, and a task from --include_path over a local JSONL file (how any
    standard task runs offline): a copy of the first 3 questions, which scores them alike."""
    workdir = run[0]
    with open(os.path.join(runner.TASKS_DIR, "data", "stdlib_qa.jsonl")) as f:
        (tmp_path / "qa.jsonl").write_text("".join(f.readlines()[:3]))
    (tmp_path / "local_qa.yaml").write_text(LOCAL_TASK.format(data=tmp_path / "qa.jsonl"))
    out = os.path.join(workdir, "results.json")
    eval_cli.main(["--workdir", workdir, "--tasks", "jaxllm_stdlib_qa,local_qa", "--limit", "3",
                   "--batch_size", "4", "--include_path", str(tmp_path), "--output", out])
    printed = capsys.readouterr().out
    assert "|jaxllm_stdlib_qa" in printed and "|local_qa" in printed and "acc_norm" in printed
    with open(out) as f:
        results = json.load(f)["results"]
    assert results["local_qa"]["acc,none"] == results["jaxllm_stdlib_qa"]["acc,none"]


def test_a_missing_task_or_run_is_a_one_line_error(run, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--workdir", run[0], "--tasks", "jaxllm_stdlib_qaa"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "no lm-eval task, group or tag named 'jaxllm_stdlib_qaa'" in err and "jaxllm_stdlib_qa" in err
    with pytest.raises(SystemExit):
        eval_cli.main(["--workdir", str(tmp_path / "missing"), "--tasks", "jaxllm_stdlib_qa"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_an_imported_run_scores_with_its_tokenizer_json(tmp_path):
    """The llama3 fixture imported (a BPE tokenizer.json with BOS): loglikelihood is the log-prob
    of the continuation's tokens after BOS + the context's, read from a plain forward pass."""
    workdir = str(tmp_path / "llama3")
    hf.import_checkpoint(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama3"), workdir,
                         C.Config())
    lm = harness.JaxllmLM(workdir, batch_size=2)
    cfg, params = lm.runs.cfgs[0], jax.device_get(lm.runs.params[0])
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    requests = [("def add(a, b):\n    return", " a + b"), ("import", " numpy as np")]
    got = lm.loglikelihood([ll_request(*r) for r in requests], disable_tqdm=True)
    logits_fn = jax.jit(lambda tokens: Transformer(cfg.model).apply({"params": params}, tokens))
    for (context, continuation), (logp, _) in zip(requests, got):
        whole, head = tok.encode(context + continuation).tolist(), tok.encode(context).tolist()
        assert whole[:len(head)] == head  # the split lm-eval makes falls on a token boundary here
        tokens = [tok.bos_id] + whole
        per_token = reference_log_probs(logits_fn)(tokens)[0]
        np.testing.assert_allclose(logp, per_token[len(head):].sum(), rtol=1e-5, atol=1e-5)
