import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import data, decoding, speculative
from jaxllm.compression import quantize
from jaxllm.config import ConfigError
from jaxllm.models import Transformer
from helpers import tiny_config

GREEDY = decoding.SamplingConfig(max_new_tokens=9, temperature=0.0, stop_at_eos=False)
PROMPTS = [[data.BOS_ID, 10, 11, 12, 13], [data.BOS_ID, 40]]


def plain_greedy(spec, params, prompts, sampling):
    """The target's own greedy tokens, by the speculative generator's target Generator with the
    cache length its rounds use (so the prefill compiles once for both)."""
    longer = dataclasses.replace(sampling, max_new_tokens=sampling.max_new_tokens + spec.gamma + 1)
    return [out[:sampling.max_new_tokens] for out in spec.target.generate(params, prompts, longer, jax.random.key(0))]


def init(cfg, seed):
    return nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def test_rejection_sampling_keeps_the_target_distribution():
    """Fixed p and q on a 4-token vocabulary, two drafted tokens drawn from q: over many keys the
    first and second emitted tokens follow p_0 and p_1 (not q), and the acceptance rate is
    Σ min(p, q) as the analysis says."""
    p = jnp.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.4, 0.1, 0.1]])
    n_samples = 40000

    def one(key):
        draft_key, accept_key = jax.random.split(key)
        drafted = jax.random.categorical(draft_key, jnp.log(q), axis=-1).astype(jnp.int32)
        n, token = speculative.accept_drafts(p, q, drafted, accept_key)
        drafted_plus = jnp.append(drafted, token)
        first = jnp.where(n >= 1, drafted_plus[0], token)
        second = jnp.where(n >= 2, drafted_plus[1], token)
        return n, first, second

    n, first, second = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), n_samples))
    n, first, second = map(np.asarray, (n, first, second))
    np.testing.assert_allclose(np.bincount(first, minlength=4) / n_samples, p[0], atol=0.012)
    # The second token exists when the first draft was accepted.
    seconds = second[n >= 1]
    np.testing.assert_allclose(np.bincount(seconds, minlength=4) / len(seconds), p[1], atol=0.015)
    np.testing.assert_allclose(np.mean(n >= 1), np.minimum(p[0], q[0]).sum(), atol=0.012)


@pytest.fixture(scope="module")
def target():
    # A larger init than training's, so that a random model does not just repeat its input.
    cfg = dataclasses.replace(tiny_config().model, init_std=0.5)
    return cfg, init(cfg, 0)


def test_greedy_speculative_equals_greedy_target(target):
    """Temperature 0: an untrained draft (mostly rejected), and the target as its own draft (all
    accepted, the bonus token every round), both give the target's greedy tokens exactly."""
    cfg, params = target
    # The draft: the target with noise on every weight, so that it agrees on some tokens only.
    noise = jax.tree.map(lambda x, k: 0.3 * x.std() * jax.random.normal(k, x.shape),
                         params, jax.tree.unflatten(jax.tree.structure(params),
                                                    jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))))
    draft = jax.tree.map(jnp.add, params, noise)
    spec = speculative.SpeculativeGenerator(cfg, cfg, gamma=3)
    expected = plain_greedy(spec, params, PROMPTS, GREEDY)
    assert spec.generate(params, draft, PROMPTS, GREEDY, jax.random.key(0)) == expected
    assert 0.1 < spec.last_stats["acceptance_rate"] < 0.9, spec.last_stats
    assert spec.generate(params, params, PROMPTS, GREEDY, jax.random.key(0)) == expected
    assert spec.last_stats["acceptance_rate"] == 1.0
    assert spec.last_stats["rounds"] == 2  # 1 token from the prefill, then 4 per round


def test_rows_stop_at_eos_as_the_target_stops(target):
    """stop_at_eos: a row that emits EOS inside a round stops there while the other goes on (the
    rounds run in one device loop, which must see the EOS itself). The EOS embedding is scaled up
    so that greedy decoding reaches it, in the two rows at different steps."""
    cfg, params = target
    eos = decoding.Generator(cfg).eos_id
    params = dict(params, embed={"embedding": params["embed"]["embedding"].at[eos].multiply(4.0)})
    sampling = decoding.SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=True)
    spec = speculative.SpeculativeGenerator(cfg, cfg, gamma=3)
    expected = plain_greedy(spec, params, PROMPTS, sampling)
    assert [row[-1] for row in expected] == [eos, eos] and len(expected[0]) != len(expected[1]), expected
    assert spec.generate(params, params, PROMPTS, sampling, jax.random.key(0)) == expected
    assert spec.generate(params, init(cfg, 3), PROMPTS, sampling, jax.random.key(0)) == expected


def test_sampled_self_draft_is_always_accepted(target):
    """Temperature 1 with top-k, the target as its own draft: q = p at every drafted position, so
    every proposal is accepted, which holds only if the draft's cache and positions stay right
    across rounds. Rows have max_new_tokens tokens; another key gives other tokens."""
    cfg, params = target
    sampling = decoding.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=5, stop_at_eos=False)
    spec = speculative.SpeculativeGenerator(cfg, cfg, gamma=2)
    first = spec.generate(params, params, PROMPTS, sampling, jax.random.key(0))
    assert [len(row) for row in first] == [10, 10]
    assert spec.last_stats["acceptance_rate"] == 1.0, spec.last_stats
    assert spec.generate(params, params, PROMPTS, sampling, jax.random.key(1)) != first


@pytest.mark.parametrize("variant", ["int8", "moe"])
def test_greedy_speculative_with_int8_and_moe_targets(target, variant):
    cfg, params = target
    if variant == "int8":
        params = quantize.quantize_params(params)
    else:
        cfg = dataclasses.replace(cfg, num_layers=1, moe=C.MoeConfig(num_experts=4, top_k=2))
        params = init(cfg, 2)
    greedy = dataclasses.replace(GREEDY, max_new_tokens=6)
    draft_params = target[1]  # the float dense model drafts
    spec = speculative.SpeculativeGenerator(cfg, target[0], gamma=2)
    expected = plain_greedy(spec, params, PROMPTS[:1], greedy)
    assert spec.generate(params, draft_params, PROMPTS[:1], greedy, jax.random.key(0)) == expected


def test_a_draft_with_another_vocabulary_is_refused(target):
    cfg, _ = target
    with pytest.raises(ConfigError, match="same vocabulary"):
        speculative.SpeculativeGenerator(cfg, dataclasses.replace(cfg, vocab_size=512), gamma=2)
