"""Where pretrained weights come from: a hub id or a local directory, and the error when neither works.

Shared by the model loaders (ddpo_rl.models) and the reward models (ddpo_rl.rewards).
"""

from __future__ import annotations

import os


class PretrainedWeightsNotFoundError(OSError):
    """The weights of a pretrained pipeline or reward model could not be found or loaded.

    A subclass of :class:`OSError`, as the errors of ``from_pretrained`` are, so existing
    ``except OSError`` handlers keep working.
    """


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id."""
    if os.path.exists(name):
        return True
    # hub ids are "name" or "org/name": a leading "/", "." or "~", a backslash or a second "/"
    # can only be a path.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
