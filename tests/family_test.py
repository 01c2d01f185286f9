"""Model families (models/family.py): a family registered from outside the library trains,
evaluates and shards through training.train unchanged; causal_lm is the built-in one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import losses
from jaxllm.models import MODELS, ModelFamily, Transformer
from jaxllm.models import causal_lm
from jaxllm.training import train
from helpers import packed_batch, tiny_config, two_train_steps


def _copy_family() -> ModelFamily:
    """A toy family: a bidirectional encoder that reproduces its input tokens (a denoising-style
    objective without the noise), with its own loss and metrics."""

    def build(cfg):
        return Transformer(dataclasses.replace(cfg.model, attention_kind="bidirectional"))

    def loss_fn(model, cfg):
        def fn(params, batch):
            logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
            loss_sum, _, weight_sum = losses.cross_entropy(logits, batch["inputs"], batch["weights"])
            return loss_sum, (loss_sum, weight_sum, {})
        return fn

    def eval_fn(model, cfg):
        def fn(params, batch):
            logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
            hits = (jnp.argmax(logits, -1) == batch["inputs"]) * batch["weights"]
            return {"hits": jnp.sum(hits), "weight_sum": jnp.sum(batch["weights"])}
        return fn

    return ModelFamily(
        build=build, init_inputs=causal_lm.init_inputs, loss_fn=loss_fn, eval_fn=eval_fn,
        eval_metrics=lambda sums: {"eval_copy_accuracy": sums["hits"] / sums["weight_sum"]},
        loss_metrics=lambda loss, cfg: {"copy_perplexity": jnp.exp(loss)},
        batches=causal_lm.batches,
    )


@pytest.fixture
def copy_family():
    MODELS.register("copy_test", _copy_family())
    yield "copy_test"
    del MODELS["copy_test"]


def test_a_registered_family_trains_evaluates_and_shards_without_edits_to_training(copy_family):
    cfg = dataclasses.replace(tiny_config(), family=copy_family, opt=dataclasses.replace(tiny_config().opt, learning_rate=1e-2))
    s, state, history = two_train_steps(cfg, jax.devices(), steps=3)
    assert isinstance(s.model, Transformer) and s.model.cfg.attention_kind == "bidirectional"
    assert "copy_perplexity" in history[0] and "bits_per_byte" not in history[0]
    np.testing.assert_allclose(history[0]["copy_perplexity"], np.exp(history[0]["loss"]), rtol=1e-5)
    assert history[-1]["loss"] < history[0]["loss"]
    # Sharded over 8 devices equals one device.
    _, single_state, single_history = two_train_steps(cfg, jax.devices()[:1], steps=3)
    for got, want in zip(history, single_history):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(single_state.params))

    class FixedBatches:  # the family's batch format, without a dataset
        def batch_rows(self, step, lo, hi):
            return {k: v[lo:hi] for k, v in packed_batch(seed=10 + step).items()}

        batch_size = 8

    metrics = train.evaluate(s, train.make_eval_step(s), state.params, FixedBatches(), 2)
    assert set(metrics) == {"eval_copy_accuracy"} and 0.0 <= metrics["eval_copy_accuracy"] <= 1.0
