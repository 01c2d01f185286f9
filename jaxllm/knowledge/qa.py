"""Question answering from the knowledge graph: exact-match accuracy of a run's greedy answers,
restored through the one restore path.

    python -m jaxllm.qa --workdir runs/knowledge_tiny_lm

Questions. Two relations have one right answer: "Which module defines `urlsplit`?" (urllib.parse;
asked only of names exactly one module defines) and "Which class does `HTTPServer` inherit from?"
(socketserver.TCPServer; only of classes with one base). Private names, builtins' names, names the
graph also has as parameters and names under three characters are not asked about (in text they
mostly stand for something else).

Design, so that the comparison of a run trained with fused facts (data.transform=kg_facts) and one
trained without them is meaningful:
- Questions come from the run's own data options (kg_triples, kg_held_out, the corpus), never from
  its transform, so an augmented run and its baseline get the same questions.
- Every question is about a fact that the training text carries: the fact is in the fused block of
  at least MIN_DOCUMENTS training documents (computed with the run's kg_max_facts); of those, the
  MAX_PER_PART fused into the most documents are asked (a short run reads a small share of the
  corpus, so rarely fused facts would be unseen: `exposures` counts what the run read). For the
  "fused" part that is the augmented run's text; the "held_out" part is made of the triples that
  kg_held_out removed by hash from what is fused, whose facts would have been fused as often had
  they not been held out. Held-out questions therefore measure what augmentation teaches beyond
  the facts themselves (the answer format, the code-reading skill); fused questions the facts.
- Two phrasings. "question" is a question the training text never contains in that form
  ("# Question: Which module defines `urlsplit`?\n# Answer: "): it tests generalisation from the
  fused statements. "fused_phrasing" starts the fact as the fused block writes it ("# fact:
  urlsplit is defined in "), a probe of whether the statements were learned at all.
- An answer is the greedy continuation up to the end of its line, stripped of spaces, quotes,
  backticks and a final period; exact match against the graph's string. answer_bits_per_byte, the
  right answer's negative log-likelihood after each prompt, shows learning that exact match cannot
  yet see (a fused part falling further than the held-out part is the facts being learned).
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import re
from typing import Sequence

import jax
import numpy as np

from jaxllm import data, restore
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config, ConfigError, DataConfig
from jaxllm.decoding import Generator, SamplingConfig, pad_prompts
from jaxllm.knowledge.fusion import FACT_PREFIX, fused_graph, graph_triples, render, select_facts
from jaxllm.knowledge.graph import VALUE_RELATIONS, KnowledgeGraph, Triple, is_held_out, unit_hash
from jaxllm.models import MODELS

MIN_DOCUMENTS = 2  # a question's fact is fused into at least this many training documents
MAX_PER_PART = 150  # questions per part (fused, held_out): the most widely fused facts, ties by hash
MAX_NEW_TOKENS = 40
PARTS = ("fused", "held_out")
STYLES = ("question", "fused_phrasing")
_PRIVATE = re.compile(r"(^|\.)_")
_FACT_LINE = re.compile("^" + re.escape(FACT_PREFIX) + r"(.*)\n", re.M)


@dataclasses.dataclass(frozen=True)
class Question:
    fact: Triple
    part: str  # fused | held_out
    entity: str  # what the question is about
    answer: str

    def prompt(self, style: str) -> str:
        if style == "fused_phrasing":
            sentence = render(self.fact, self.entity)
            return FACT_PREFIX + sentence[: len(sentence) - len(self.answer)]
        if self.fact.relation == "defines":
            question = f"Which module defines `{self.entity}`?"
        else:
            question = f"Which class does `{self.entity}` inherit from?"
        return f"# Question: {question}\n# Answer: "


def _askable(triples: Sequence[Triple]) -> list[tuple[Triple, str, str]]:
    """(fact, entity, answer) of the triples with exactly one right answer."""
    definers = collections.Counter(t.object for t in triples if t.relation == "defines")
    modules = {t.subject for t in triples if t.relation in ("defines", "imports")}
    bases = collections.Counter(t.subject for t in triples if t.relation == "inherits_from")
    # Names that also stand for other things in text (builtins, parameters) make ambiguous questions.
    ambiguous = set(dir(builtins)) | {t.object for t in triples if t.relation in VALUE_RELATIONS}
    out = []
    for t in triples:
        if t.relation == "defines" and definers[t.object] == 1 and t.object not in modules:
            out.append((t, t.object, t.subject))
        elif t.relation == "inherits_from" and bases[t.subject] == 1 and definers[t.subject] == 1:
            out.append((t, t.subject, t.object))
    return [(t, e, a) for t, e, a in out if not _PRIVATE.search(e) and e not in ambiguous and len(e) >= 3]


def _fused_counts(kg: KnowledgeGraph, docs: Sequence[str], max_facts: int) -> collections.Counter:
    """How many documents' fused blocks hold each rendered fact."""
    counts: collections.Counter = collections.Counter()
    for text in docs:
        counts.update(set(select_facts(kg, text, max_facts)))
    return counts


def questions(cfg: DataConfig) -> list[Question]:
    """The questions of a run's data options (see the module docstring); deterministic."""
    triples, _ = graph_triples(cfg)
    docs = data.load_documents(dataclasses.replace(cfg, transform=""), cfg.train_split)
    texts = [docs[i] for i in range(len(docs))]
    fused_counts = _fused_counts(fused_graph(cfg, triples), texts, cfg.kg_max_facts)
    whole_counts = _fused_counts(KnowledgeGraph(triples), texts, cfg.kg_max_facts)
    chosen: dict[str, list[tuple[int, float, Question]]] = {p: [] for p in PARTS}
    for fact, entity, answer in _askable(triples):
        part = "held_out" if is_held_out(fact, cfg.kg_held_out) else "fused"
        count = (whole_counts if part == "held_out" else fused_counts)[render(fact, entity)]
        if count >= MIN_DOCUMENTS:
            chosen[part].append((-count, unit_hash(fact), Question(fact, part, entity, answer)))
    # The most widely fused facts: the ones a short run can have read more than once.
    chosen = {p: [q for *_, q in sorted(chosen[p], key=lambda x: x[:2])[:MAX_PER_PART]] for p in PARTS}
    return chosen["fused"] + chosen["held_out"]


def answer_of(generated: str) -> str:
    """A generated continuation's answer: its first line, without quotes and a final period."""
    line = generated.split("\n", 1)[0].strip()
    return line.rstrip(".").strip("`'\" ")


def exact_match(answers: Sequence[str], expected: Sequence[str]) -> float:
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers for {len(expected)} questions")
    return sum(a == e for a, e in zip(answers, expected)) / max(len(expected), 1)


def greedy_answers(cfg: Config, params, prompts: Sequence[str]) -> list[str]:
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    ids = [tokenizer_lib.prompt_ids(tok, p) for p in prompts]
    generated = Generator(cfg.model, mesh).generate(params, ids, sampling, jax.random.key(0))
    return [answer_of(tok.decode(g)) for g in generated]


def answer_bits_per_byte(cfg: Config, params, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Each answer's negative log-likelihood after its prompt, in bits per byte of the answer: a
    graded view of what exact match sees as right or wrong."""
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    rows = [(tokenizer_lib.prompt_ids(tok, p), tok.encode(a).tolist()) for p, a in zip(prompts, answers)]
    inputs, segment_ids, positions, _ = pad_prompts([p + a for p, a in rows], "right", tok.pad_or_eos)
    model = MODELS.get(cfg.family).build(cfg)
    logits = jax.jit(model.apply)({"params": params}, inputs, segment_ids, positions)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    out = []
    for i, (p, a) in enumerate(rows):
        steps = np.arange(len(p) - 1, len(p) + len(a) - 1)  # the logits that predict the answer's tokens
        nll = -logp[i, steps, inputs[i, steps + 1]].sum()
        out.append(float(nll / np.log(2) / max(len(answers[i].encode()), 1)))
    return out


def score(qs: Sequence[Question], answers: dict[str, list[str]]) -> dict:
    """Exact match per phrasing and part, and the number of questions per part."""
    out: dict = {"num_questions": {p: sum(q.part == p for q in qs) for p in PARTS}}
    for style, given in answers.items():
        out[style] = {p: exact_match([a for a, q in zip(given, qs) if q.part == p],
                                     [q.answer for q in qs if q.part == p]) for p in PARTS}
    return out


def exposures(cfg: Config, qs: Sequence[Question]) -> dict:
    """How often the fused questions' facts stood as whole lines in the rows a kg_facts run trained
    on (batches 0 .. train.steps - 1): whether the run can have learned them at all."""
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    batches = data.train_batches(cfg)
    seen: collections.Counter = collections.Counter()
    for t in range(cfg.train.steps):
        for row in batches.global_batch(t)["inputs"]:
            seen.update(_FACT_LINE.findall(tok.decode(row)))
    counts = sorted(seen[render(q.fact, q.entity)] for q in qs if q.part == "fused")
    return {"fact_lines_trained_on": sum(seen.values()), "distinct_facts_trained_on": len(seen),
            "fused_questions_seen_at_least_once": sum(c > 0 for c in counts),
            "fused_questions_median_times_seen": counts[len(counts) // 2] if counts else 0}


def evaluate(workdir: str, qs: Sequence[Question] | None = None, examples: int = 0) -> dict:
    """Exact-match accuracies of `workdir`'s greedy answers to `qs` (default: `questions` of the
    run's own data options), plus the first `examples` questions with their answers."""
    cfg, params = restore.load_params(workdir)
    if not MODELS.get(cfg.family).generates:
        raise ConfigError(f"{workdir} is a {cfg.family} run, which does not generate answers")
    qs = questions(cfg.data) if qs is None else list(qs)
    if not qs:
        raise ConfigError(f"no questions for {workdir}'s data options (data.kg_triples={cfg.data.kg_triples!r})")
    # Both phrasings in one batch: one compiled prefill and decode step, one scoring pass.
    prompts = [q.prompt(style) for style in STYLES for q in qs]
    generated = greedy_answers(cfg, params, prompts)
    all_bits = answer_bits_per_byte(cfg, params, prompts, [q.answer for _ in STYLES for q in qs])
    answers = {style: generated[k * len(qs):(k + 1) * len(qs)] for k, style in enumerate(STYLES)}
    bits = {style: all_bits[k * len(qs):(k + 1) * len(qs)] for k, style in enumerate(STYLES)}
    result = score(qs, answers)
    result["answer_bits_per_byte"] = {  # means per part
        style: {p: round(float(np.mean([b for b, q in zip(bits[style], qs) if q.part == p] or [np.nan])), 4)
                for p in PARTS} for style in STYLES}
    run_cfg = restore.load_config(workdir)  # the batches it trained on, not inference's
    if run_cfg.data.transform == "kg_facts":
        result["exposures"] = exposures(run_cfg, qs)
    result["examples"] = [{"part": q.part, "prompt": q.prompt("question"), "expected": q.answer,
                           **{style: answers[style][i] for style in STYLES},
                           **{f"{style}_bits_per_byte": round(bits[style][i], 4) for style in STYLES}}
                          for i, q in enumerate(qs[:examples])]
    return result
