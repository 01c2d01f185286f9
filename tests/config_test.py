import pytest

from jaxllm import config as C
from jaxllm import validation


def test_override_nested_and_typed_values():
    cfg = C.override(C.Config(), ["model.num_layers=2", "train.steps=50", "mesh.fsdp=4",
                                  "model.scan_layers=false", "opt.learning_rate=1e-4",
                                  "workdir=/tmp/x", "opt.no_decay=norm,embed"])
    assert cfg.model.num_layers == 2 and cfg.train.steps == 50 and cfg.mesh.fsdp == 4
    assert cfg.model.scan_layers is False and cfg.opt.learning_rate == 1e-4
    assert cfg.workdir == "/tmp/x" and cfg.opt.no_decay == ("norm", "embed")


@pytest.mark.parametrize("key", ["workdir", "train.steps", "train.batch_size", "train.seq_len",
                                 "model.num_layers", "model.d_model", "mesh.data", "mesh.fsdp",
                                 "mesh.tensor", "mesh.expert"])
def test_command_line_contract_keys_exist(key):
    assert key in C.valid_keys(C.Config())


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(C.ConfigError, match=r"unknown config key 'model.num_layer'.*model.num_layers"):
        C.override(C.Config(), ["model.num_layer=3"])
    with pytest.raises(C.ConfigError, match=r"train.steps"):
        C.override(C.Config(), ["train.step=3"])


def test_bad_values_are_clear_errors():
    with pytest.raises(C.ConfigError, match="cannot parse train.steps='many'"):
        C.override(C.Config(), ["train.steps=many"])
    with pytest.raises(C.ConfigError, match="key=value"):
        C.override(C.Config(), ["train.steps"])


def test_config_round_trips_through_dict():
    cfg = C.override(C.Config(), ["model.d_model=128", "opt.no_decay=norm"])
    assert C.from_dict(C.Config, C.to_dict(cfg)) == cfg
    hash(cfg)  # frozen dataclasses are hashable: usable as static jit args and Linen attributes


def test_validate_rejects_inconsistent_model():
    with pytest.raises(C.ConfigError, match="num_kv_heads"):
        validation.validate(C.override(C.Config(), ["model.num_heads=4", "model.num_kv_heads=3"]))
    with pytest.raises(C.ConfigError, match="grad_accum"):
        validation.validate(C.override(C.Config(), ["train.batch_size=10", "train.grad_accum=3"]))


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=0", "train.grad_accum must be positive, got 0"),
    ("train.grad_accum=-2", "train.grad_accum must be positive, got -2"),
    ("model.dtype=bf16", "model.dtype='bf16'; choose float32, bfloat16 or float16"),
    ("model.attention_impl=flash", "model.attention_impl='flash'; choose xla, cudnn, splash or auto"),
    ("model.attention_impl=cudnn", "model.attention_impl=cudnn needs model.dtype=bfloat16"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be at least 1"),
    ("distill.hidden_layers=(1)", "entry '\\(1\\)' is not 'student_layer:teacher_layer'"),
    ("model.num_heads=0", "model.num_heads must be positive, got 0"),
    ("model.num_layers=0", "model.num_layers must be positive, got 0"),
    ("model.d_model=-8", "model.d_model must be positive, got -8"),
    ("model.num_kv_heads=-2", "model.num_kv_heads must be >= 0"),
    ("model.moe.expert_dim=-1", "model.moe.expert_dim must be >= 0"),
    ("train.eval_batches=0", "train.eval_batches must be positive, got 0"),
    ("train.steps=1e400", "cannot parse train.steps='1e400' as int"),
    ("workdir=runs/teacher", "is the student's own workdir"),
])
def test_values_that_would_fail_later_are_rejected_up_front(override, message):
    with pytest.raises(C.ConfigError, match=message):
        cfg = C.override(C.Config(), [override, "distill.teacher_workdir=runs/teacher"])
        validation.validate(cfg)


def test_tuple_values_are_literals_or_comma_separated_text():
    # A regex that starts with a parenthesis (as the defaults do) is text, not a Python literal.
    cfg = C.override(C.Config(), ["prune.include=(^|/)attn/(q|k|v|o)$,(^|/)mlp/up$"])
    assert cfg.prune.include == ("(^|/)attn/(q|k|v|o)$", "(^|/)mlp/up$")
    assert C.override(C.Config(), ["opt.no_decay=('norm', 'embed')"]).opt.no_decay == ("norm", "embed")
    assert C.override(C.Config(), ["distill.hidden_layers=1:3,3:7"]).distill.layer_pairs() == ((1, 3), (3, 7))
