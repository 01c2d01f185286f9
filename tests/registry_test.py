"""Registries drive the config: every registered-kind field is validated against its registry, and
an unknown name is a one-line error that names the key and the registered kinds."""

import pytest

from jaxllm import config as C
from jaxllm import validation
from jaxllm.registry import Registry


@pytest.mark.parametrize("override, listed", [
    ("model.attention_kind=flash", "causal, dot_product, bidirectional, prefix_lm, sliding_window"),
    ("model.mlp_kind=reglu", "swiglu, geglu, gelu, gelu_tanh, moe"),
    ("model.norm_kind=scalenorm", "rmsnorm, rmsnorm_plus_one, layernorm"),
    ("model.norm_placement=middle", "pre, sandwich, post"),
    ("model.position_kind=alibi", "rope, learned, none"),
    ("model.attention_pattern=sliding_window,flash", "causal, dot_product, bidirectional, prefix_lm, sliding_window"),
    ("model.remat=some", "none, full, save_dots"),
    ("family=vision", "causal_lm, masked_lm, classifier, late_fusion, vlm"),
    ("model.moe.router=sinkhorn", "softmax_topk, topk_softmax"),
    ("model.moe.dispatch=ragged", "capacity, dropless, expert_choice"),
    ("model.moe.grouped_matmul=megablocks", "auto, blocked, ragged_dot, dense"),
    ("distill.loss=kl", "forward_kl, reverse_kl, jsd"),
    ("distill.hidden_loss=l1", "cosine, mse"),
])
def test_an_unknown_kind_is_one_line_naming_the_registered_ones(override, listed):
    cfg = C.override(C.Config(), [override, "model.moe.num_experts=4"])
    with pytest.raises(C.ConfigError) as error:
        validation.validate(cfg)
    message = str(error.value)
    key, value = override.split("=")
    value = value.split(",")[-1]
    assert message == f"{key}={value!r} is not registered; choose one of {listed}"


def test_a_name_registers_once_and_lookups_say_what_is_missing():
    things = Registry("model.thing")

    @things.register("a")
    def a():
        return "a"

    things.register("b", "b value")
    assert things.get("a") is a and things.get("b") == "b value"
    with pytest.raises(ValueError, match="already registered"):
        things.register("a", 1)
    with pytest.raises(C.ConfigError, match=r"^model.thing='c' is not registered; choose one of a, b$"):
        things.get("c")
