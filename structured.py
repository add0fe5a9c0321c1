"""Mappings of config entries into typed dataclasses, for config fields typed ``dict[str, Any]``.

OmegaConf 2.3 cannot assign a plain mapping to a ``dict[str, SomeDataclass]`` node, which is what Hydra's
``+data.sources.web={paths: [...]}`` and ``+data.sources.web.paths=[...]`` do (they fail with "dict is not a
subclass of SourceConfig"). Such fields are therefore typed ``dict[str, Any]`` and their entries converted
here, in the owning dataclass's ``__post_init__``, with the same type checks and unknown-key errors a typed
node would give, named by the entry's full key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def structured_entry(cls: type[T], entry: Any, *, key: str) -> T:
    """``entry`` (a dict or DictConfig of ``cls``'s fields, or a ``cls``) as a ``cls``; ``key`` names it in errors.

    Missing fields take ``cls``'s defaults; values are converted and validated as OmegaConf does for a typed
    node (``weight=abc`` fails, ``weight=2`` becomes 2.0), and ``cls.__post_init__`` runs.
    """
    if isinstance(entry, cls):
        return entry
    if not isinstance(entry, (dict, DictConfig)):
        raise ValueError(f"{key} must be a mapping of {cls.__name__} fields, got {entry!r}; "
                         f"e.g. +{key}={{{_example_fields(cls)}}}")  # fmt: skip
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), entry))
    except OmegaConfBaseException as err:
        field_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        # The first line is the problem; the rest repeats the key in OmegaConf's relative form.
        problem = str(err).splitlines()[0]
        raise ValueError(f"{field_key}: {problem}; {cls.__name__} fields: {_field_names(cls)}") from None


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _example_fields(cls: type) -> str:
    return ", ".join(f"{name}: ..." for name in _field_names(cls)[:2])
