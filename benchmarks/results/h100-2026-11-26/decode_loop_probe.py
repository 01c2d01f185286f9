"""Per-token time of Generator.generate (decode + sampling in one jitted program) against the
previous loop (jitted decode_step, eager split/argmax, host masking), side by side."""
import json, statistics, sys, time, os
sys.path.insert(0, os.path.join(os.getcwd(), "experiments"))
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from tiny_lm import get_config
from jaxllm import generate, data
from jaxllm.model import Transformer

cfg = get_config().model
params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
gen = generate.Generator(cfg)
sampling = generate.SamplingConfig(max_new_tokens=128, temperature=0.0, stop_at_eos=False)

def old_loop(prompts):
    tokens, segs, pos, lengths = generate.pad_prompts(prompts, "left")
    B, P = tokens.shape
    cache = gen.init_cache(B, P + sampling.max_new_tokens)
    p = gen.decode_params(params)
    logits, cache = gen.prefill(p, cache, *map(jnp.asarray, (tokens, segs, pos, np.full(B, P - 1, np.int32))))
    rng = jax.random.key(0); nxt = lengths.copy(); times = []; start = time.perf_counter()
    for t in range(sampling.max_new_tokens):
        rng, step = jax.random.split(rng)
        new = np.asarray(generate.choose_tokens(logits, step, sampling))
        now = time.perf_counter(); times.append(now - start); start = now
        if t + 1 == sampling.max_new_tokens: break
        logits, cache = gen.decode_step(p, cache, jnp.asarray(new), jnp.asarray(nxt)); nxt = nxt + 1
    return statistics.median(times[1:])

def new_loop(prompts):
    gen.generate(params, prompts, sampling, jax.random.key(0))
    return statistics.median(gen.last_timings["step_s"])

rng = np.random.default_rng(0)
for B in (1, 8):
    for P in (64, 512):
        prompts = [[data.BOS_ID, *rng.integers(0, 256, P - 1).tolist()] for _ in range(B)]
        old_loop(prompts); new_loop(prompts)  # compile
        o, n = [], []
        for _ in range(5):
            o.append(old_loop(prompts)); n.append(new_loop(prompts))
        print(json.dumps({"batch": B, "prompt": P, "old_step_s": statistics.median(o),
                          "new_step_s": statistics.median(n), "speedup": statistics.median(o) / statistics.median(n),
                          "backend": jax.default_backend()}))
