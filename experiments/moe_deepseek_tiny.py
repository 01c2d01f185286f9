"""moe_deepseek_tiny: tiny_lm with DeepSeek-V3-style MoE blocks: the first block dense, then 32
fine-grained experts (4 routed + 1 shared per token, each of width 704 / 5 = 140, so the active
MLP parameters match tiny_lm's), sigmoid routing with the aux-loss-free bias (moved by 1e-3 per
step against the step's expert load), no auxiliary loss, routed scale 2.5, group-limited top-k
(4 groups, 2 chosen). `aux_loss_config()` is the same model balanced by the usual auxiliary loss
instead (no bias), `unbalanced_config()` by neither.

    python experiments/moe_deepseek_tiny.py [key=value ...]
    python benchmarks/moe_balance.py        # all three on the same batches, JSON per model

Result (2-core CPU heavily shared with other jobs; benchmarks/moe_balance.py at 80 steps of batch 8):
worst-layer load imbalance (busiest expert's share over the mean) averaged over the run 7.8 with
the bias at u=1e-3 (collapsed onto one expert, like no balancing at 7.7; the bias moves too slowly
for 80 steps at lr 3e-3), 5.1 with the aux loss (2.9 at the end); validation loss 2.433 / 2.457 /
2.425. With model.moe.bias_update_rate=0.01 the bias catches up: 5.8 averaged, 1.9 at step 80 (aux loss:
2.9), validation loss 2.377. See benchmarks/README.md, "DeepSeek-style MoE and multi-head latent attention".
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import comparison_config as tiny_config  # noqa: E402  (experiments build on each other)

STEPS = 150


def get_config() -> config.Config:
    base = tiny_config()
    width = base.model.mlp_dim // 5
    return dataclasses.replace(
        base,
        workdir="runs/moe_deepseek_tiny",
        train=dataclasses.replace(base.train, steps=STEPS, eval_every=STEPS),
        model=dataclasses.replace(
            base.model,
            moe=config.MoeConfig(num_experts=32, top_k=4, expert_dim=width, num_shared=1, shared_dim=width,
                                 first_dense=1, dispatch="dropless", router="sigmoid", router_bias=True,
                                 bias_update_rate=1e-3, routed_scale=2.5, num_groups=4, topk_groups=2,
                                 aux_loss_weight=0.0, z_loss_weight=0.0),
        ),
    )


def aux_loss_config() -> config.Config:
    """Balanced by the Switch auxiliary loss (weight 1e-2) on the normalised affinities, no bias."""
    cfg = get_config()
    moe = dataclasses.replace(cfg.model.moe, router_bias=False, bias_update_rate=0.0, aux_loss_weight=1e-2)
    return dataclasses.replace(cfg, workdir="runs/moe_deepseek_tiny_aux",
                               model=dataclasses.replace(cfg.model, moe=moe))


def unbalanced_config() -> config.Config:
    cfg = aux_loss_config()
    moe = dataclasses.replace(cfg.model.moe, aux_loss_weight=0.0)
    return dataclasses.replace(cfg, workdir="runs/moe_deepseek_tiny_none",
                               model=dataclasses.replace(cfg.model, moe=moe))


if __name__ == "__main__":
    main.run(get_config)
