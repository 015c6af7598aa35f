"""Stopping without losing anything.

Ctrl-C (SIGINT) asks for a stop: the run finishes the step it is in, every rank agrees on that step,
a checkpoint is written, and the process exits; a second Ctrl-C stops at once. SIGTERM — what a
launcher sends to the other ranks when one has died, and what schedulers send on pre-emption — is
turned into `SystemExit`, so `finally` blocks still run and the W&B run is finished and flushed.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequested(KeyboardInterrupt):
    """Raised after the checkpoint of a requested stop has been written."""


class SignalGuard:
    def __init__(self) -> None:
        self.stop_requested = False
        self._previous: dict[int, object] = {}

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\ndvtrain: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    @staticmethod
    def _on_sigterm(signum, frame) -> None:
        raise SystemExit(128 + signum)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
            }
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Terminated(BaseException):
    """SIGTERM during a command without checkpoints (`dvtrain eval`, `dvtrain compare`): unwinds like
    Ctrl-C, so `finally` blocks run and only whole files stay behind. `code` is the exit status, 128 + 15."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.code = 128 + signum


class TerminateGuard:
    """Within it, SIGTERM raises `Terminated` in the main thread (Ctrl-C raises KeyboardInterrupt as usual)."""

    def __init__(self) -> None:
        self._previous = None

    @staticmethod
    def _on_sigterm(signum, frame) -> None:
        raise Terminated(signum)

    def __enter__(self) -> "TerminateGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
