"""Registries: a name -> implementation table per kind of component (attention kinds, MLP kinds,
routers, dispatch strategies, model families, ...). The config selects by name; validation reads
the tables, so an unknown name is a one-line error that lists the registered ones.

A research fork adds a component with one decorated function or class:

    @MLP_KINDS.register("my_mlp")
    class MyMlp(nn.Module): ...
"""

from __future__ import annotations

from typing import Any, Callable

from jaxllm.config import ConfigError


class Registry(dict):
    """A dict of name -> implementation that knows which config key selects from it."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key  # e.g. "model.attention_kind"

    def register(self, name: str, value: Any = None) -> Callable:
        """`REGISTRY.register(name, value)`, or `@REGISTRY.register(name)` as a decorator."""
        if value is not None:
            self._add(name, value)
            return value

        def decorator(obj):
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, value: Any) -> None:
        if name in self:
            raise ValueError(f"{self.key} {name!r} is already registered")
        self[name] = value

    def get(self, name: str) -> Any:  # type: ignore[override]
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is not registered; choose one of {', '.join(self)}")
        return self[name]

    def check(self, name: str, allowed_extra: tuple[str, ...] = ()) -> None:
        if name not in self and name not in allowed_extra:
            choices = [*allowed_extra, *self]  # registration order: the built-in kinds first
            raise ConfigError(f"{self.key}={name!r} is not registered; choose one of {', '.join(choices)}")
