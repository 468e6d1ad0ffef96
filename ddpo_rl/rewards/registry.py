"""Reward functions by name: ``make_reward("jpeg_compressibility", resize=32)``.

A reward module registers its factories (classes or functions returning a reward callable)
with the :func:`register_reward` decorator::

    @register_reward("laion_aesthetic", "aesthetic")
    class LaionAesthetic(torch.nn.Module): ...

The registry does not import reward modules eagerly (some pull in open_clip or large models):
:data:`_LAZY_MODULES` maps each built-in name to the module that registers it, and
:func:`make_reward` imports that module the first time the name is asked for. A new built-in
reward adds its names there; code outside ddpo_rl can call :func:`register_lazy_reward`, or
pass ``"package.module:factory"`` to :func:`make_reward` directly.
"""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

_FACTORIES: dict[str, Callable] = {}
"""Canonical name -> factory (populated by @register_reward when a module is imported)."""
_ALIASES: dict[str, str] = {}
"""Alias -> canonical name."""
_LAZY_MODULES: dict[str, str] = {
    # name or alias -> module whose import registers it
    "jpeg_compressibility": "ddpo_rl.rewards.jpeg",
    "jpeg_incompressibility": "ddpo_rl.rewards.jpeg",
    "compressibility": "ddpo_rl.rewards.jpeg",
    "incompressibility": "ddpo_rl.rewards.jpeg",
    "digit_alignment": "ddpo_rl.rewards.digits",
    "alignment": "ddpo_rl.rewards.digits",
    "aesthetic": "ddpo_rl.rewards.aesthetic",
    "laion_aesthetic": "ddpo_rl.rewards.aesthetic",
    "digit_realism": "ddpo_rl.rewards.digit_realism",
    "realism": "ddpo_rl.rewards.digit_realism",
    "sample_diversity": "ddpo_rl.rewards.diversity",
    "diversity": "ddpo_rl.rewards.diversity",
    "vlm_alignment": "ddpo_rl.rewards.alignment",
    "blip_alignment": "ddpo_rl.rewards.alignment",
}


def _normalize(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("-", "_")


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_reward(name: str, *aliases: str) -> Callable[[F], F]:
    """Class/function decorator: make ``make_reward(name, **kwargs)`` call the decorated factory.

    Args:
        name: canonical name (lower case; ``-`` is read as ``_``).
        aliases: other names for the same factory.

    Raises:
        ValueError: a name is already taken by a different factory.
    """
    canonical = _normalize(name)
    alias_names = [_normalize(a) for a in aliases]

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"@register_reward({name!r}) needs a class or function, got {factory!r}")
        old = _FACTORIES.get(canonical)
        # re-registering the same object (e.g. a module reload) is allowed
        if old is not None and _qualname(old) != _qualname(factory):
            raise ValueError(f"reward {canonical!r} is already registered to {_qualname(old)}")
        for a in alias_names:
            target = _ALIASES.get(a, a if a in _FACTORIES else None)
            if target is not None and target != canonical:
                raise ValueError(f"reward alias {a!r} already points to {target!r}")
        _FACTORIES[canonical] = factory
        for a in alias_names:
            if a != canonical:
                _ALIASES[a] = canonical
        return factory

    return decorator


def register_lazy_reward(module: str, *names: str) -> None:
    """Declare that importing ``module`` registers ``names``; the import waits for first use."""
    for n in names:
        _LAZY_MODULES[_normalize(n)] = module


def available_rewards() -> list[str]:
    """Every name :func:`make_reward` accepts (registered or lazily declared, aliases included)."""
    return sorted(set(_FACTORIES) | set(_ALIASES) | set(_LAZY_MODULES))


def get_reward_factory(name: str) -> Callable:
    """The factory registered under ``name`` (importing its module if needed)."""
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES and key in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[key])
        key = _ALIASES.get(key, key)
    if key in _FACTORIES:
        return _FACTORIES[key]
    if ":" in name:  # "package.module:factory"
        module, _, attr = name.strip().partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import reward factory {name!r}: {e}") from e
    if key in _LAZY_MODULES:
        raise ValueError(
            f"importing {_LAZY_MODULES[key]} did not register reward {key!r} (missing @register_reward?)"
        )
    raise ValueError(
        f"unknown reward {name!r}; valid names: {', '.join(available_rewards())} "
        "(or 'package.module:factory')"
    )


def make_reward(name: str, **kwargs):
    """Build the reward function registered as ``name`` with ``kwargs``.

    Built-in names: ``jpeg_compressibility`` (alias ``compressibility``),
    ``jpeg_incompressibility`` (``incompressibility``), ``digit_alignment`` (``alignment``),
    ``aesthetic`` (``laion_aesthetic``), ``vlm_alignment`` (``blip_alignment``), plus whatever
    other modules register. Example: ``make_reward("compressibility", resize=32)``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or ``kwargs`` the factory
            does not take (the message lists the ones it does).
    """
    factory = get_reward_factory(name)
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


def _check_kwargs(name: str, factory: Callable, kwargs: dict) -> None:
    """Raise ValueError, naming the accepted arguments, if ``factory(**kwargs)`` cannot bind."""
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins, some C extensions: let the call itself decide
        return
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        accepted = [p for p, v in sig.parameters.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        raise ValueError(
            f"reward {name!r}: bad reward_kwargs {sorted(kwargs)} ({err}); it accepts {', '.join(accepted) or 'none'}"
        ) from None
