"""Typed values from TOML, `--set`, Flower's run config or a node config: one coercion for all.

`quote` decides whether an error repeats the value: a user's own command line may (it helps
them see the typo); a node config error may not, as Flower sends a ClientApp's error text to
the coordinator.
"""

from __future__ import annotations

import math
from typing import Any

from fedtune.common.errors import FedtuneError

KINDS = {"bool": bool, "int": int, "float": float, "str": str}


def coerce(key: str, value: Any, kind: Any, *, source: str = "config key", quote: bool = True) -> Any:
    """`value` as `kind` (a type or its name), or a FedtuneError naming the key and what was expected."""
    kind = KINDS.get(str(kind), kind)
    got = f", got {value!r}." if quote else "."

    def fail(expected: str) -> FedtuneError:
        return FedtuneError(f"{source} '{key}' must be {expected}{got}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise fail("true or false")
    if kind in (int, float) and isinstance(value, bool):
        raise fail("a number")
    if kind is int:
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        except ValueError:
            raise fail("a whole number") from None
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number):
            raise fail("a number")
        return number
    return str(value)
