import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxllm import batching, data, decoding
from jaxllm.cli import generate as generate_cli
from jaxllm.models import Transformer
from helpers import tiny_config

PROMPTS = [[data.BOS_ID, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [data.BOS_ID, 40],
           [data.BOS_ID, 50, 51, 52], [data.BOS_ID, 60, 61, 62, 63, 64, 65], [data.BOS_ID, 70, 71]]


def test_continuous_batching_equals_one_at_a_time():
    """Five prompts of 2-20 tokens in two slots, greedy, with an EOS token that ends some
    sequences early: every output equals the one-row-per-prompt batch's (which equals one prompt
    at a time, tests/generate_test.py), so rows refilled mid-way keep their own lengths."""
    cfg = dataclasses.replace(tiny_config().model, init_std=0.5)  # a random model that does not repeat itself
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    greedy = decoding.SamplingConfig(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    free = decoding.Generator(cfg).generate(params, PROMPTS, greedy, jax.random.key(0))
    # A token that some outputs emit part-way plays EOS, so sequences end at different steps.
    eos = free[1][2]
    reference = decoding.Generator(cfg)
    batcher = batching.ContinuousBatcher(cfg, slots=2, bucket=8)
    reference.eos_id = batcher.gen.eos_id = eos
    stopping = dataclasses.replace(greedy, stop_at_eos=True)
    expected = reference.generate(params, PROMPTS, stopping, jax.random.key(0))
    assert len({len(out) for out in expected}) > 1
    assert batcher.generate(params, PROMPTS, stopping, jax.random.key(0)) == expected
    assert batcher.last_stats["prefills"] == len(PROMPTS)
    # Fewer steps than one row decoding every prompt in turn.
    assert batcher.last_stats["decode_steps"] < sum(len(out) for out in expected) - len(PROMPTS)



@pytest.mark.parametrize("slots, steps_per_call", [(2, 3), (6, 64)])
def test_continuous_batching_with_own_limits_equals_each_prompt_alone(slots, steps_per_call):
    """Each prompt with its own limit of new tokens (0 and 1 included): every output equals the
    prompt decoded alone up to that limit, whether decode calls are cut short by steps_per_call
    (2 slots, 3 steps a call) or all prompts are admitted by one prefill whose rows are padded to a
    power of two (5 prompts, 6 slots: 6 prefill rows, one of them padding that must be dropped)."""
    cfg = dataclasses.replace(tiny_config().model, init_std=0.5)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    limits = [5, 0, 9, 1, 3]
    alone = decoding.Generator(cfg)
    expected = [alone.generate(params, [p], decoding.SamplingConfig(n, 0.0, stop_at_eos=False), jax.random.key(0))[0]
                if n else [] for p, n in zip(PROMPTS, limits)]
    assert len(expected[2]) > 3  # (padding a model emits is dropped, as by Generator.generate)
    batcher = batching.ContinuousBatcher(cfg, slots=slots, bucket=8, steps_per_call=steps_per_call)
    greedy = decoding.SamplingConfig(max_new_tokens=max(limits), temperature=0.0, stop_at_eos=False)
    assert batcher.generate(params, PROMPTS, greedy, jax.random.key(0), limits) == expected
    stats = batcher.last_stats
    assert stats["prefills"] == len(PROMPTS)
    if slots >= len(PROMPTS):
        assert stats["prefill_calls"] == 1
    else:
        assert stats["decode_calls"] >= -(-max(limits) // 3)

def test_generate_command_refuses_a_prompts_file_with_prompts(tmp_path, capsys):
    # (The command's decoding itself is ContinuousBatcher, tested above; a run of it on the 8
    # test devices costs minutes of compilation.)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('def \n"x\\ny"\n')
    with pytest.raises(SystemExit) as bad:
        generate_cli.main(["--workdir", str(tmp_path), "--prompts_file", str(prompts), "--prompt", "a"])
    assert bad.value.code == 2 and "give --prompts_file or --prompt" in capsys.readouterr().err
