"""One Ctrl-C during `fedtune simulate`: stop within seconds, tear Ray down, say which round is
checkpointed and the exact command that resumes the run; exit 130. No traceback, no second Ctrl-C.

The run directory is always consistent (the checkpoint is written atomically before a round's
metrics and ledger lines), so the process may end at any point; the round in progress is redone
on resume, and clients that already paid for it re-send it without paying twice.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
from pathlib import Path

INTERRUPTED = 130
TEARDOWN_SECONDS = 8  # Ray's shutdown gets this long; the process ends regardless after it
_LEAVING = threading.Lock()


def interrupted_message(run_dir: Path, num_rounds: int) -> str:
    """Which round is checkpointed and how to continue, from what is on disk now."""
    from fedtune.server.checkpoint import Checkpoint

    if not (run_dir / "run.json").is_file():
        return "interrupted before the run started: nothing to resume\n"
    try:
        checkpoint = Checkpoint.load(run_dir)
    except Exception:  # unreadable mid-write is impossible (atomic), but never fail here
        checkpoint = None
    done = checkpoint.completed_round if checkpoint else 0
    saved = (f"round {done} of {num_rounds} is checkpointed in {run_dir}" if done else
             f"no round finished yet; {run_dir} starts again from round 1")
    command = f"fedtune simulate --resume {shlex.quote(str(run_dir))}"
    return f"interrupted: {saved} (round {done + 1} will be redone)\nresume with: {command}\n"


class StopOnInterrupt:
    """SIGINT handler for the simulation's lifetime (the main thread's)."""

    def __init__(self, run_dir: Path, *, num_rounds: int) -> None:
        self.run_dir, self.num_rounds = Path(run_dir), num_rounds
        self._lock = threading.Lock()
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def _handle(self, signum, frame) -> None:
        if not self._lock.acquire(blocking=False):
            os._exit(INTERRUPTED)  # a second Ctrl-C during the teardown: at once
        message = interrupted_message(self.run_dir, self.num_rounds)
        family = _descendants()  # Ray's raylet, workers and agents, before any is re-parented away
        # Ray's actors die now; what the engine's threads say about it is noise, not news.
        logging.disable(logging.CRITICAL)
        threading.excepthook = lambda args: None
        terminal = os.dup(2)
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 2)
        watchdog = threading.Timer(TEARDOWN_SECONDS, _leave, args=(terminal, message, family))
        watchdog.daemon = True
        watchdog.start()
        try:
            import ray

            ray.shutdown()
        except BaseException:
            pass
        _leave(terminal, message, family)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _ray_in_our_group() -> list:
    """Ray processes of this process group that are no longer our descendants (Ray re-parents its
    agents); other members of the group, such as `| jq`, are left alone."""
    import psutil

    group, found = os.getpgrp(), []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and os.getpgid(process.pid) == group and \
                    any("ray" in part for part in (process.info["cmdline"] or [])[:2]):
                found.append(process)
        except (OSError, psutil.Error):
            pass
    return found


def _leave(terminal: int, message: str, family: list) -> None:
    """Print the resume line, then kill whatever Ray left running (a slow shutdown on a loaded
    machine leaves its agents behind for tens of seconds), and exit.

    The line comes first: once the raylet is killed, Ray's core worker in this process ends it with
    status 1 as soon as it notices, without a word; under load the watchdog gets here while
    ray.shutdown() is still running, so killing first sometimes lost the line and the exit status.
    The raylet and the GCS are stopped (SIGSTOP) before anything is killed, so the raylet starts no
    agent meanwhile, and killed last, right before this process exits."""
    import sys

    import psutil

    if not _LEAVING.acquire(blocking=False):  # the watchdog and the handler both got here: one speaks
        threading.Event().wait()  # the other exits the process
    try:
        sys.stdout.flush()  # the round table printed so far
    except Exception:
        pass
    os.write(terminal, message.encode())
    left = {*family, *_descendants(), *_ray_in_our_group()}  # agents started or re-parented late too
    core = {process for process in left if _is_ray_core(process)}
    for process in core:  # frozen first: a stopped raylet starts no agent, and closes no socket
        try:
            process.suspend()
        except psutil.Error:
            pass
    left |= {*_descendants(), *_ray_in_our_group()}  # whatever it started before it stopped
    for process in sorted(left, key=lambda process: process in core):
        try:
            process.kill()  # psutil checks it is still the same process (pid reuse), else raises
        except psutil.Error:
            pass
    os._exit(INTERRUPTED)


def _is_ray_core(process) -> bool:
    """The raylet or the GCS: the processes whose death ends this one (Ray's core worker exits)."""
    try:
        return any(name in " ".join(process.cmdline()[:2]) for name in ("raylet", "gcs_server"))
    except Exception:  # gone already, or not ours to read
        return False
