"""ddpo_rl.stop: the first SIGINT/SIGTERM asks for a stop, the second stops at once; handlers are put back."""

import os
import signal
import threading

import pytest

from ddpo_rl.stop import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_second_insists_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested  # the run goes on to the end of its epoch
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker():
        stop = StopRequest().install()
        seen.append(signal.getsignal(signal.SIGTERM))
        stop.restore()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before
