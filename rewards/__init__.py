"""Reward models: differentiable and black-box, tiny and full scale.

A reward is an object with
    name: str, title: str (how it is shown everywhere), differentiable: bool,
    __call__(x, cond) -> (B,) tensor        x: generated samples in the task's data space
    features(x) -> (B, F) tensor            encoder features for diversity / prior preservation
Modules in this package register a factory with ``@register_reward("name")``; ``get(name, **cfg)``
builds one. A black-box reward (differentiable = False) may return a tensor without grad.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

REWARDS: dict[str, Callable] = {}


def register_reward(name: str):
    def deco(factory):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        REWARDS[name] = factory
        return factory
    return deco


def load_all() -> dict[str, Callable]:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return REWARDS


def get(name: str, **cfg):
    load_all()
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**cfg)
