import pytest

from jaxllm import config as C


def test_override_nested_and_typed_values():
    cfg = C.override(C.Config(), ["model.num_layers=2", "train.steps=50", "mesh.fsdp=4",
                                  "model.scan_layers=false", "opt.learning_rate=1e-4",
                                  "workdir=/tmp/x", "opt.no_decay=norm,embed"])
    assert cfg.model.num_layers == 2 and cfg.train.steps == 50 and cfg.mesh.fsdp == 4
    assert cfg.model.scan_layers is False and cfg.opt.learning_rate == 1e-4
    assert cfg.workdir == "/tmp/x" and cfg.opt.no_decay == ("norm", "embed")
    assert C.Config().model.num_layers != 2  # the default is untouched (frozen dataclasses)


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
        C.validate(C.override(C.Config(), ["model.num_heads=4", "model.num_kv_heads=3"]))
    with pytest.raises(C.ConfigError, match="grad_accum"):
        C.validate(C.override(C.Config(), ["train.batch_size=10", "train.grad_accum=3"]))
