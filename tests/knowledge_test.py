"""Knowledge-augmented training: the AST extractor's triples, whole-identifier entity matching, the
kg_facts transform (deterministic, documents without entities unchanged, in the pipeline), a clear
error for a malformed triples file, triples from TFDS, the QA questions and exact match, and resume
with the transform on."""

import dataclasses
import json
import os
import shutil
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxllm import config as C
from jaxllm import data, restore, validation
from jaxllm.knowledge import fusion, qa, stdlib_graph
from jaxllm.knowledge.graph import KnowledgeGraph, Triple, read_jsonl, unit_hash
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train
from helpers import tiny_config

MODULE = textwrap.dedent('''
    """A hand-written module."""
    import os, xml.etree.ElementTree as ET
    from . import sibling
    from .. import parent_thing
    from .util import helper
    from collections import abc

    def f(a, /, b, *args, c=1, **kw):
        import json
        return a

    async def g():
        pass

    class C(Base, mod.Other, metaclass=Meta):
        def method(self, x):
            pass

    class D(Generic[T]):
        pass

    if True:
        def hidden():
            pass
''')

TRIPLES = [
    ("urllib.parse", "defines", "urlsplit"), ("urlsplit", "takes", "url"), ("shlex", "defines", "split"),
    ("ast", "defines", "parse"), ("HTTPServer", "inherits_from", "TCPServer"),
    ("http.server", "defines", "HTTPServer"), ("http.server", "imports", "socketserver"),
]


def write_triples(path, triples=TRIPLES):
    path.write_text("".join(json.dumps({"subject": s, "relation": r, "object": o}) + "\n" for s, r, o in triples))
    return str(path)


def test_extractor_triples_of_a_hand_written_module():
    got = stdlib_graph.extract_triples(MODULE, "pkg.sub.mod")
    m = "pkg.sub.mod"
    want = [(m, "defines", "f"), *[("f", "takes", p) for p in ("a", "b", "args", "c", "kw")],
            (m, "defines", "g"), (m, "defines", "C"), ("C", "inherits_from", "Base"),
            ("C", "inherits_from", "mod.Other"), (m, "defines", "D"),
            *[(m, "imports", n) for n in ("os", "xml.etree.ElementTree", "pkg.sub", "pkg", "pkg.sub.util",
                                          "collections", "json")]]
    assert sorted(got) == sorted(want) and len(got) == len(want)
    # A package's __init__ resolves relative imports against itself and never imports itself.
    assert stdlib_graph.extract_triples("from . import x\nfrom .a import b\n", "pkg", is_package=True) == [
        ("pkg", "imports", "pkg.a")]
    assert stdlib_graph.extract_triples("def broken(:\n", "m") == []
    assert [stdlib_graph.module_name(p) for p in ("os.py", "urllib/parse.py", "urllib/__init__.py")] == [
        "os", "urllib.parse", "urllib"]


def test_entities_match_whole_identifiers_only():
    kg = KnowledgeGraph([Triple(*t) for t in TRIPLES])
    text = ("from urllib.parse import urlsplit\nurlsplit(u); splitext(p); x.split(); ast.parse(s)\n"
            "url = 1; _split; split_; 2split; urllib.parse.urlsplit; HTTPServer(TCPServer)")
    names = [name for name, _ in kg.mentions(text)]
    # `split` only as the attribute `x.split`; `parse` only after `ast.`, never inside
    # `urllib.parse`; `url` is a parameter (a value), not an entity.
    assert names == ["urllib.parse", "urlsplit", "urlsplit", "split", "ast", "parse", "urllib.parse", "urlsplit",
                     "HTTPServer", "TCPServer"]
    for name, offset in kg.mentions(text):
        assert text[offset:offset + len(name)] == name


def test_transform_is_deterministic_and_leaves_documents_without_entities_unchanged(tmp_path):
    cfg = C.DataConfig(transform="kg_facts", kg_triples=write_triples(tmp_path / "kg.jsonl"), kg_max_facts=2)
    fn = data.DOCUMENT_TRANSFORMS.get("kg_facts")(cfg).fn
    plain = "nothing to see: splitext(p), url = 2\n"
    assert fn(plain) is plain
    text = "import os\nparts = urlsplit(link)\nserver = HTTPServer()\n"
    fused = fn(text)
    assert fused == fn(text) == data.DOCUMENT_TRANSFORMS.get("kg_facts")(cfg).fn(text)
    # The most specific entity first; at most kg_max_facts; seen from the mentioned entity.
    assert fused == "# fact: urlsplit is defined in urllib.parse\n# fact: urlsplit takes url\n\n" + text
    appended = data.DOCUMENT_TRANSFORMS.get("kg_facts")(dataclasses.replace(cfg, kg_format="appendix")).fn(text)
    assert appended == text + "\n# fact: urlsplit is defined in urllib.parse\n# fact: urlsplit takes url\n"
    # Held-out triples are never fused.
    held = fusion.fused_graph(dataclasses.replace(cfg, kg_held_out=0.999999), [Triple(*t) for t in TRIPLES])
    assert fusion.select_facts(held, text, 8) == []


def test_transform_in_the_pipeline(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"a.py": "u = urlsplit(x)\n", "b.py": "print('no entity here')\n", "c.py": "pass\n",
             "d.py": "s = HTTPServer()\n"}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    plain = C.DataConfig(dataset="text_files", text_files=str(corpus / "*.py"), data_dir=str(tmp_path / "tfds"),
                         eval_fraction=0.0, eval_split="")
    fused = dataclasses.replace(plain, transform="kg_facts", kg_triples=write_triples(tmp_path / "kg.jsonl"))
    before, after = data.load_documents(plain, "train"), data.load_documents(fused, "train")
    for old, new in zip(before, after):
        assert new == old if "entity" in old or old == "pass\n" else new.startswith("# fact: ") and new.endswith(old)
    # Each config's token stream is cached under its own key; batches stay a function of (seed, t).
    tokens, starts = data.token_stream(fused, "train")
    assert data.decode(tokens[starts[0] + 1:starts[1] - 1]) == after[0]
    a, b = data.Batches(fused, "train", 16, 4), data.Batches(fused, "train", 16, 4)
    for t in (0, 3):
        for key, value in a.global_batch(t).items():
            np.testing.assert_array_equal(value, b.global_batch(t)[key])
    assert len(data.token_stream(plain, "train")[0]) < len(tokens)


def test_malformed_triples_file_is_a_clear_error_naming_the_line(tmp_path):
    path = tmp_path / "kg.jsonl"
    path.write_text('{"subject": "a", "relation": "r", "object": "b"}\n\n{"subject": "a", "relation": "r"\n')
    with pytest.raises(C.ConfigError, match=rf"^{path}:3: not JSON"):
        read_jsonl(str(path))
    path.write_text('{"subject": "a", "relation": "r", "object": ""}\n')
    with pytest.raises(C.ConfigError, match=rf"^{path}:1: needs non-empty string fields"):
        read_jsonl(str(path))
    with pytest.raises(C.ConfigError, match="data.transform='kg_fact' is not registered; choose one of , kg_facts"):
        validation.validate(dataclasses.replace(tiny_config(), data=C.DataConfig(transform="kg_fact")))


def test_answers_are_the_first_line_stripped_and_scored_by_exact_match():
    assert qa.answer_of(" `urllib.parse`.\nimport os") == "urllib.parse"
    assert qa.exact_match(["urllib.parse", "os"], ["urllib.parse", "os.path"]) == 0.5


def test_resume_with_the_transform_is_exact_and_qa_scores_the_restored_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"m{i}.py").write_text(f"import http.server\nparts = urlsplit(link{i})\n" * (3 + i)
                                         + "print('plain')\n" * 20)
    data_cfg = C.DataConfig(dataset="text_files", text_files=str(corpus / "*.py"), data_dir=str(tmp_path / "tfds"),
                            eval_fraction=0.0, eval_split="", transform="kg_facts",
                            kg_triples=write_triples(tmp_path / "kg.jsonl"))

    cfg = tiny_config(workdir=str(tmp_path / "run"), data=data_cfg,
                      checkpoint=C.CheckpointConfig(every=2, keep=3, async_save=False),
                      train=dataclasses.replace(tiny_config().train, steps=4))
    straight_log = []
    straight = jax.device_get(train.train(cfg, log=straight_log.append).params)
    # Interrupted after step 2: the later checkpoint is gone; the rerun resumes from step 2.
    shutil.rmtree(os.path.join(ckpt.checkpoint_dir(cfg.workdir), "4"))
    resumed_log = []
    resumed = train.train(cfg, log=resumed_log.append)
    assert resumed_log[0]["step"] == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), straight)
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log if r["step"] > 2]

    # QA through the restore path: one question whose answer is the run's own greedy answer, one not.
    loaded, params = restore.load_params(cfg.workdir)
    fact = Triple("urllib.parse", "defines", "urlsplit")
    probe = qa.Question(fact, "fused", "urlsplit", "urllib.parse")
    (own,) = qa.greedy_answers(loaded, params, [probe.prompt("question")])
    questions = [dataclasses.replace(probe, answer=own), dataclasses.replace(probe, answer=own + "-not")]
    result = qa.evaluate(cfg.workdir, questions)
    assert result["question"]["fused"] == 0.5 and result["num_questions"] == {"fused": 2, "held_out": 0}
    # Answer likelihoods do not depend on what else is in the batch (padding is masked).
    prompts, answers = [probe.prompt("question"), probe.prompt("fused_phrasing")], ["urllib.parse", "os"]
    both = qa.answer_bits_per_byte(loaded, params, prompts, answers)
    alone = [qa.answer_bits_per_byte(loaded, params, [p], [a])[0] for p, a in zip(prompts, answers)]
    np.testing.assert_allclose(both, alone, rtol=1e-5)
    assert all(b > 0 for b in both) and result["answer_bits_per_byte"]["question"]["fused"] > 0


class KgTestTriples(tfds.core.GeneratorBasedBuilder):
    """A knowledge graph as a TFDS dataset (subject, relation, object text features)."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {k: tfds.features.Text() for k in ("subject", "relation", "object")}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (s, r, o) in enumerate(TRIPLES):
            yield i, {"subject": s, "relation": r, "object": o}


def test_triples_from_a_tfds_dataset_and_questions_from_the_fused_facts(tmp_path):
    data_dir = str(tmp_path / "tfds")
    KgTestTriples(data_dir=data_dir, file_format="array_record").download_and_prepare()
    cfg = C.DataConfig(data_dir=data_dir, kg_triples="kg_test_triples")
    assert fusion.graph_triples(cfg)[0] == [Triple(*t) for t in TRIPLES]
    # Questions: about facts fused into at least qa.MIN_DOCUMENTS training documents, split by hash.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["a = urlsplit(x)\n", "b = urlsplit(y)\n", "HTTPServer()\n", "pass\n"]):
        (corpus / f"m{i}.py").write_text(text)
    cfg = dataclasses.replace(cfg, dataset="text_files", text_files=str(corpus / "*.py"), eval_fraction=0.0,
                              eval_split="")
    (fused,) = qa.questions(cfg)
    assert (fused.part, fused.entity, fused.answer) == ("fused", "urlsplit", "urllib.parse")
    assert fused.prompt("fused_phrasing") == "# fact: urlsplit is defined in "
    held = dataclasses.replace(cfg, kg_held_out=unit_hash(fused.fact) + 1e-12)
    assert [(q.part, q.entity) for q in qa.questions(held)] == [("held_out", "urlsplit")]
