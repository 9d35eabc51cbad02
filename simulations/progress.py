"""Progress inside a round: each simulated client writes its DP steps into a small file
(client/trainer.py, through the ClientApp's progress mod), and `fedtune simulate` shows a
transient status line from them, at most 80 columns, which each round's table row replaces."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from rich.console import Console

PROGRESS_DIR = "progress"  # in the run directory, while the run goes; removed when it finishes


# The status line's width: an 80-column terminal less the spinner and its space.
STATUS_WIDTH = 78


def describe(directory: Path, *, round_number: int, since: float, clients: int, now: float | None = None) -> str:
    """'round 2: 3/5 trained, client-1 4/15, client-4 2/15, 12 s' from the files newer than
    `since`: the clients done, then those still training (DP steps done/planned), as many as fit
    STATUS_WIDTH with the rest counted ('+2 more')."""
    done, running = 0, []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if float(state.get("time", 0)) < since:
            continue  # a previous round's
        if state["steps"] and state["step"] >= state["steps"]:
            done += 1
        else:
            running.append(f"{path.stem} {state['step']}/{state['steps']}")
    head, tail = f"round {round_number}: {done}/{clients} trained", f"{(now or time.time()) - since:.0f} s"
    for count in range(len(running), -1, -1):  # the most clients that fit, the rest counted
        line = ", ".join([head, *running[:count], *([f"+{len(running) - count} more"] if count < len(running) else []),
                          tail])
        if len(line) <= STATUS_WIDTH:
            break
    return line


class RoundProgress:
    """A status line on a terminal (nothing elsewhere) that the round table's rows replace."""

    def __init__(self, directory: Path, console: Console, *, clients: int, first_round: int,
                 enabled: bool) -> None:
        self.directory, self.console, self.clients = directory, console, clients
        self.round, self.since = first_round, time.time()
        self.status = console.status(self._text(), spinner="dots") if enabled and console.is_terminal else None

    def _text(self) -> str:
        return describe(self.directory, round_number=self.round, since=self.since, clients=self.clients)

    def __enter__(self) -> RoundProgress:
        if self.status is not None:
            self.status.start()
            self._tick()
        return self

    def _tick(self) -> None:
        import threading

        def loop() -> None:
            while self.status is not None:
                self.status.update(self._text())
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True).start()

    def wrap(self, on_round: Callable[[dict], None]) -> Callable[[dict], None]:
        """The round table's `add`, then the next round's line starts from zero."""

        def add(record: dict) -> None:
            on_round(record)
            self.round, self.since = int(record["round"]) + 1, time.time()

        return add

    def __exit__(self, *exc) -> None:
        status, self.status = self.status, None
        if status is not None:
            status.stop()

    def remove_files(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
