"""User errors on the command line: one line naming the field, no traceback, a non-zero exit.

Every recipe's entry point runs inside :func:`report_user_errors`::

    with report_user_errors():
        run(parse_cli(argv))

An error caused by the user's input (a :class:`~ddpo_rl.config.ConfigError`, a missing file, a bad
value met while building components, a damaged checkpoint...) prints ``error: <field>: <what and
how to fix>`` on stderr and exits with status 2. ``DDPO_RL_DEBUG=1`` re-raises it with its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys

EXIT_USER_ERROR = 2

def failed_to_load(err: BaseException, kwargs_option: str, more: str = "") -> str:
    """"failed to load: <type>: <message on one line> (<hint><more>)" for a reward whose model cannot
    be loaded. The library's message names the reward's keyword argument (e.g. ``weights=...``); the
    user gives it through ``kwargs_option``, which the hint names."""
    message = " ".join(str(err).split())
    return (f"failed to load: {type(err).__name__}: {message} "
            f"(a keyword argument named above goes in {kwargs_option} as JSON{more})")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", reported in one line."""
    from ddpo_rl.config import ConfigError
    from ddpo_rl.hub import PretrainedWeightsNotFoundError
    from ddpo_rl.rewards.transform import RewardError

    # ValueError: a bad value met while building components (CLIError, CheckpointError included)
    return (ConfigError, FileNotFoundError, RewardError, PretrainedWeightsNotFoundError, ValueError)


@contextlib.contextmanager
def report_user_errors(*extra: type[BaseException]):
    """Turn user errors (and ``extra`` types) raised inside into one ``error:`` line and exit 2."""
    try:
        yield
    except (*user_errors(), *extra) as err:
        if os.environ.get("DDPO_RL_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}  (set DDPO_RL_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
