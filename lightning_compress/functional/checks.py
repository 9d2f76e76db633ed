"""The argument checks every entry point shares: one rule and one message per kind of argument.

Each returns the value it accepted (so ``self.x = check_...("x", x)`` reads in one line) and raises the error the
standards ask for: it names the parameter, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def check_choice(name: str, value: T, allowed: Collection[T]) -> T:
    """``value`` if it is one of ``allowed``; ValueError ``name=value is not supported; allowed: [...]``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {list(allowed)}")
    return value


def check_positive_int(name: str, value: Any, optional: bool = False) -> Any:
    """``value`` if it is an int >= 1 (bools refused), or None when ``optional``; ValueError otherwise."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value


def check_patterns(name: str, patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    """Compile the regexes of a ``targets`` / ``ignore``-style argument: one string, a list of them, or None.

    Raises:
        TypeError: not a string, a list of strings or None. ValueError: a string that is not a valid regex.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence):
        raise TypeError(f"{name} must be a regex string or a list of them, got {patterns!r}")
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a regex string or a list of them, got {p!r} in {patterns!r}")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{name} holds an invalid regex {p!r}: {err}") from None
    return compiled
