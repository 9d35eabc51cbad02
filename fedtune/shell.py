"""What every `fedtune` command prints with: the console, the error stream, the input-error exit code."""

from __future__ import annotations

import sys

from rich.console import Console

err = Console(stderr=True)
INPUT_ERROR = 3  # 1 and 2 are the audit's verdicts (verification failed, budget exceeded)


def console() -> Console:
    """Rich output; when piped, wide enough that tables are not cut to 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 120)
