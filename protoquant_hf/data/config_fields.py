"""Building the synthetic datasets' frozen config dataclasses from plain dicts (CLI / JSON / keyword use)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def config_from_fields(cls, fields: Mapping[str, Any]):
    """`cls(**fields)` for a config dataclass, refusing unknown field names by name (missing ones take defaults)."""
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}; the fields are {known}.")
    return cls(**fields)
