"""A clean stop on SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption): the first signal asks, the second insists.

The first signal only sets :attr:`StopRequest.requested`; the recipe reads it between epochs, finishes
the epoch in progress, writes its checkpoint and summary, and returns. A second signal raises
KeyboardInterrupt at once (for a user who will not wait for the epoch). Every recipe that trains for
epochs (the DDPO recipes, dppo_gym) stops by this one rule.

Handlers can only be installed from the main thread: elsewhere (a recipe run inside a worker thread)
none is installed and the signals keep their previous behaviour.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether a stop was asked for; :meth:`install` makes SIGINT/SIGTERM ask, :meth:`restore` undoes it.
    Also a context manager (installed inside the ``with`` block)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:  # the second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            try:
                previous = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread
                continue
            self._previous.setdefault(sig, previous)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
