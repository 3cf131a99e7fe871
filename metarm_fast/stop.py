"""SIGINT/SIGTERM during training: finish the step, save, return."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, save and return; a second SIGINT stops at once
    (KeyboardInterrupt: the meta step restores the weights on its way out)."""

    def __init__(self):
        self.requested: str | None = None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
