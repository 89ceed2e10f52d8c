"""The one rule for layer names used by every option (targets, exclusions, ranks, methods).

A key is either an exact qualified module name (``"layer4.1.conv2"``), a glob
pattern (``"layer4.*"``, ``"features.?"``), or a regular expression prefixed
with ``re:`` (``"re:layer[34]\\..*conv2"``) matched against the whole name. A
key that matches no layer is an error that names the closest real layers, so a
typo never silently does nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from stagecomp.errors import NoMatchingLayerError

_T = TypeVar("_T")
_GLOB_CHARS = set("*?[")


def key_matches(key: str, name: str) -> bool:
    """Whether the option key ``key`` selects the layer called ``name``."""
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    if _GLOB_CHARS & set(key):
        return fnmatch.fnmatchcase(name, key)
    return key == name


def _no_match_error(key: str, names: Sequence[str], option: str) -> NoMatchingLayerError:
    close = difflib.get_close_matches(key.removeprefix("re:"), names, n=3, cutoff=0.5)
    hint = f"; closest layer names: {', '.join(close)}" if close else ""
    return NoMatchingLayerError(
        f"{option} key {key!r} matches no layer of the model{hint} "
        "(keys are qualified names, glob patterns like 'layer4.*', or 're:<regex>')"
    )


def check_keys(keys: Iterable[str], names: Sequence[str], option: str) -> None:
    """Raise ``NoMatchingLayerError`` for the first key that selects none of ``names``."""
    for key in keys:
        if not isinstance(key, str):
            raise NoMatchingLayerError(
                f"{option} key {key!r} is not a string; use a qualified layer name or a pattern"
            )
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as error:
                raise NoMatchingLayerError(
                    f"{option} key {key!r} is not a valid regular expression: {error}"
                ) from None
        if not any(key_matches(key, name) for name in names):
            raise _no_match_error(key, names, option)


def select(names: Sequence[str], keys: Iterable[str]) -> list[str]:
    """The names (in their order) selected by at least one key."""
    keys = list(keys)
    return [name for name in names if any(key_matches(k, name) for k in keys)]


def lookup(mapping: Mapping[str, _T], name: str) -> tuple[bool, _T | None]:
    """The value for ``name``: an exact key wins, else the last matching pattern.

    Returns ``(found, value)`` so that a value of ``None`` (e.g. "exclude this
    layer") can be told apart from "no key matched".
    """
    if name in mapping:
        return True, mapping[name]
    found, value = False, None
    for key, candidate in mapping.items():
        if key_matches(key, name):
            found, value = True, candidate
    return found, value
