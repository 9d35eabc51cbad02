"""What every `fedtune` command prints with and exits with: the consoles, the exit codes, and the
one-line report of an unexpected error (its traceback goes to a log file, never to the terminal)."""

from __future__ import annotations

import os
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape

# Piped or redirected, a line stays one line (`grep` finds it whole): rich wraps only on a terminal.
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())

# Exit codes, one meaning each (documented in `fedtune --help` and the README).
CLEAN = 0
VERIFICATION_FAILED = 1  # the audit's verdicts
BUDGET_EXCEEDED = 2
INPUT_ERROR = 3  # bad input: a file, a config value, a run directory
USAGE_ERROR = 4  # the command line itself: unknown option, missing argument, no such command
UNEXPECTED_ERROR = 5  # a bug or an environment failure: one line here, the traceback in a log file
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_CODES_HELP = ("Exit codes: 0 clean, 1 verification failed, 2 budget exceeded, 3 bad input, "
                   "4 usage error, 5 unexpected error (traceback in a log file), 130 interrupted.")

# Where an unexpected error's log goes when the command knows its run directory (`simulate` sets it).
log_dir_hint: list[Path] = []


def versions_line() -> str:
    """fedtune's version and its engines', from package metadata (torch is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"fedtune {of('fedtune')} (flwr {of('flwr')}, opacus {of('opacus')}, torch {of('torch')})"


def console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """Rich output; when piped, lines are never wrapped and tables are 120 columns, not 80."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(width=None if terminal else 120, soft_wrap=not terminal, stderr=stderr, quiet=quiet)


def error_line(message: str) -> None:
    """'error: MESSAGE' on stderr; the message is escaped, so a bracket in a path is text, not markup."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def _log_dirs() -> list[Path]:
    """The run directory when known, else the user's cache (XDG), else the working directory."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtune" / "logs"
    return [*(d for d in log_dir_hint if d.is_dir()), cache, Path.cwd()]


def traceback_without_values(exc: BaseException) -> str:
    """Each exception's type and the code it ran through, never its message or local variables:
    either may quote a record (`int("<a patient's note>")` puts the note in the message)."""
    parts = []
    while exc is not None:
        frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
        parts.append(f"Traceback (most recent call last):\n{frames}{type(exc).__module__}.{type(exc).__qualname__}\n")
        exc = exc.__cause__ or exc.__context__
    return "\n(while handling the one below)\n\n".join(parts)


def write_error_log(exc: BaseException) -> Path | None:
    """The traceback, without messages or local variables, in a new file only its owner reads."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = f"fedtune {sys.argv[1] if len(sys.argv) > 1 else ''}\n{stamp} UTC\n\n{traceback_without_values(exc)}"
    for directory in _log_dirs():
        path = directory / f"fedtune-error-{stamp}-{os.getpid()}.log"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
            return path
        except OSError:
            continue
    return None


def report_unexpected(exc: BaseException) -> int:
    """One line on stderr, the traceback in a log file; the exit code to use."""
    path = write_error_log(exc)
    where = f"the traceback is in {path}" if path else "no log file could be written"
    err.print(f"[bold red]unexpected error:[/bold red] {escape(_summary(exc))} ({where}: the code path only, no "
              f"messages or values; please report it)",
              highlight=False, soft_wrap=True)
    return UNEXPECTED_ERROR


def _summary(exc: BaseException) -> str:
    """The exception's type; its message only for the environment's errors (a path, an errno),
    since another exception's message may quote a value from the data."""
    if isinstance(exc, OSError):
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    return type(exc).__name__
