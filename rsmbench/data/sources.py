"""The registry of pretraining data sources.

A source registers with ``@register_data(name)``: a factory(**cfg) → an object with
``sample(n, generator) -> (x0 (n, *shape), cond (n,) long or None)``. A task's ``data:`` section
names the source and, optionally, the ``module`` to import where it registers; without one, the
module ``rsmbench.data.<name>`` is imported if it exists (``gmm`` registers there)."""
from __future__ import annotations

import importlib
import importlib.util

DATA_SOURCES: dict = {}


def register_data(name: str):
    def deco(factory):
        DATA_SOURCES[name] = factory
        return factory
    return deco


def data_source(name: str, module: str | None = None, **cfg):
    if module is None and importlib.util.find_spec(f"rsmbench.data.{name}") is not None:
        module = f"rsmbench.data.{name}"
    if module:
        importlib.import_module(module)
    if name not in DATA_SOURCES:
        raise KeyError(f"unknown data source {name!r}; choose from {', '.join(sorted(DATA_SOURCES))}")
    return DATA_SOURCES[name](**cfg)
