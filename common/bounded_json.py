"""JSON from a file someone else wrote, read in bounded memory and depth.

A receipt or a roster comes from another party. Python's json.loads recurses once per nested
bracket: 100,000 of them raise RecursionError (an "unexpected error" instead of a one-line
refusal), and a file of any size is read whole. Here a file above `max_bytes` is refused before
it is read, and nesting deeper than `max_depth` before it is parsed: both as ValueError, which
the callers already turn into their one-line "not a ... file" error. No value from the file is
ever put in the message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 20  # 1 MiB: a roster of thousands of members, a receipt of thousands of rounds
MAX_DEPTH = 32  # the formats read here nest 4 deep
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string, escapes included
_BRACKET = re.compile(r"[\[\]{}]")


class TooLarge(ValueError):
    """The file is larger, or nests deeper, than a file of its kind ever does."""


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of `text`, brackets inside JSON strings not counted."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_bounded(text: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, refusing (TooLarge) nesting deeper than `max_depth` before parsing."""
    if nesting_depth(text) > max_depth:
        raise TooLarge(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen below max_depth; kept so no input ever escapes as one
        raise TooLarge(f"nested deeper than {max_depth} levels") from None


def read_json_file(path: Path, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `path`. FileNotFoundError and OSError as open() raises them; TooLarge for a
    file above `max_bytes` (checked before reading) or nested deeper than `max_depth`; UnicodeDecodeError
    and ValueError (json.JSONDecodeError) for a file that is not UTF-8 JSON."""
    path = Path(path)
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)  # never more than the cap, whatever stat() says
    if len(data) > max_bytes:
        raise TooLarge(f"larger than {max_bytes} bytes")
    return loads_bounded(data.decode("utf-8"), max_depth=max_depth)
