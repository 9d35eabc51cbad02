"""How a count reads in a message: "1 round", "3 rounds", "probe round 1", "probe rounds 1-3"."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """`count` and `noun`, plural unless the count is one (nouns here take a plain "s")."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def rounds_from_1(last: int, *, kind: str = "round") -> str:
    """Rounds 1 to `last`: "probe round 1" for one, "probe rounds 1-3" for three."""
    return f"{kind} 1" if last == 1 else f"{kind}s 1-{last}"
