"""SIGTERM and Ctrl-C during training: a flag read at step boundaries, so the run can checkpoint and exit 0."""

from __future__ import annotations

import os
import signal


class GracefulStop:
    """SIGTERM and Ctrl-C (SIGINT) become a flag read at step boundaries, so the run can checkpoint and exit 0.

    A second Ctrl-C raises KeyboardInterrupt at once (the command line prints one line for it); a repeated
    SIGTERM changes nothing (a launcher's final word is SIGKILL anyway).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool) -> None:
        self.received: str | None = None
        self.announce = announce
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signal.Signals(signum).name
        if self.announce:  # os.write: safe inside a signal handler, unlike logging or print
            hint = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{self.received}: stopping after this step with a resume checkpoint{hint}\n".encode())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
