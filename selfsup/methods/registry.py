"""The method registry: name → class, family and paper, filled by ``@register`` in each method file."""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any

from torch import nn

from selfsup.config import ConfigError, _coerce
from selfsup.methods.base import MethodSpec, method_spec


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type[nn.Module]
    family: str
    paper: str

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.cls)


METHODS: dict[str, MethodInfo] = {}
FAMILIES = ("contrastive", "clustering", "self-distillation", "redundancy-reduction", "masked-modelling",
            "latent-prediction", "pretext", "distillation")
"""``distillation``: a student learns a fixed, pretrained teacher's embeddings (not an EMA of itself, which is
self-distillation)."""


def register(name: str, family: str, paper: str):
    """Class decorator: ``@register("simclr", "contrastive", "Chen et al. 2020, arXiv:2002.05709")``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def wrap(cls):
        method_spec(cls)  # a method without its spec fails at import, not in the middle of a run
        if name in METHODS and METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodInfo(name, cls, family, paper)
        cls.method_name = name
        return cls

    return wrap


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError([f"unknown method {name!r}{hint}; registered: {', '.join(sorted(METHODS))}"])
    return METHODS[name]


def method_params(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters a method's constructor takes besides the backbone."""
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items() if n not in ("self", "backbone") and
            p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_method_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Unknown keys and wrong types, all at once; returns params with numbers coerced to their annotations."""
    info = get_method(name)
    allowed = method_params(info.cls)
    hints = typing.get_type_hints(info.cls.__init__)
    problems: list[str] = []
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            problems.append(f"method {name!r} has no parameter 'method.params.{key}'; it takes: {', '.join(allowed)}")
            continue
        out[key] = _coerce(value, hints.get(key, Any), f"method.params.{key}", problems) if key in hints else value
    if problems:
        raise ConfigError(problems)
    return out
