"""jaxllm: sharded decoder-only language models in JAX/Flax.

Module map:

- `config.py` dataclasses and overrides; `registry.py` name → implementation; `validation.py`
  config checks against the registries
- `sharding.py` mesh (multi-slice too) and logical rules; `distributed.py` multi-process start-up
- `planning/`: `topology.py` TPU topologies, `plan.py` ahead-of-time compile and report,
  `generation.py` prefill and decode step, `hlo.py` collectives and costs of a compiled program (`cli/plan.py`: `python -m jaxllm.plan`)
- `tokenizer.py` bytes and `tokenizer.json`; `data.py` text sources, packing, batches; `masking.py`
  BERT's masked-LM batches;
  `labelled.py` labelled text and its batches; `images.py` images with text and their batches
- `ops/` fast paths: `projection.py`, `attention.py`, `ffn.py`, `grouped_ffn.py`
- `layers/` plain building blocks: `base.py`, `attention.py`, `mlp.py`, `moe.py`,
  `sliding_window.py`, `expert_choice.py`, `mla.py` (multi-head latent attention)
- `models/` families: `family.py`, `transformer.py`, `causal_lm.py`, `classifier.py`, `vit.py` (the
  vision tower and projectors), `vlm.py`, `late_fusion.py`, `masked_lm.py` (the encoder and its MLM head)
- `losses.py` pure losses
- `training/`: `optim.py`, `checkpoint.py`, `logger.py`, `flops.py`, `finetune.py`, `train.py`,
  `workdir_lock.py` (one writer per workdir), `metrics_file.py` (metrics.jsonl read and repaired)
- `restore.py` the one restore path from a workdir to params on a mesh
- `compression/`: `pruning.py`, `quantize.py`, `distill.py`, `lora.py`
- `interop/`: `hf_config.py`, `hf.py` (Hugging Face checkpoints), `hf_encoders.py` (BERT, RoBERTa,
  GPT-2)
- `decoding.py` cached generation; `speculative.py` speculative decoding; `batching.py` continuous
  batching; `main.py` the experiments' entry point
- `knowledge/`: `graph.py` triples and entity matching, `stdlib_graph.py` the stdlib's graph from
  `ast`, `fusion.py` the kg_facts transform, `qa.py` the question-answering evaluation (`cli/qa.py`)
- `combine/`: `ensemble.py` (prediction ensembles), `generation.py` (ensemble sampling),
  `soup.py` (uniform, greedy and last-K weight averages); `training/ema.py` the params' EMA;
  `plots.py` run comparison plots
- `evaluation/`: `harness.py` the lm-eval model class, `runner.py` tasks and reports,
  `tasks/` the embedded offline tasks (YAML, JSONL, `loaders.py`), `build_tasks.py` their data
  (`cli/eval.py`: `python -m jaxllm.eval`)
- `cli/` the commands (`generate`, `quantize`, `prune`, `hf`, `plan`, `classify`, `qa`, `ensemble`, `soup`,
  `plot`, `eval`; each also `python -m jaxllm.X`)
"""
