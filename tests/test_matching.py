"""The one naming rule: exact names, globs, ``re:`` patterns, and errors for typos."""

from __future__ import annotations

import pytest

from stagecomp.errors import NoMatchingLayerError
from stagecomp.matching import check_keys, key_matches, lookup, select

NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer4.1.conv2", "fc"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("fc", ["fc"]),
        ("conv1", ["conv1"]),
        ("layer1.*", ["layer1.0.conv1", "layer1.0.conv2"]),
        ("*conv2", ["layer1.0.conv2", "layer4.1.conv2"]),
        (r"re:layer\d\.\d\.conv2", ["layer1.0.conv2", "layer4.1.conv2"]),
        ("re:conv", []),  # a regex must match the whole name
    ],
)
def test_select(key: str, expected: list[str]) -> None:
    assert select(NAMES, [key]) == expected


def test_exact_name_is_not_a_prefix_match() -> None:
    assert not key_matches("layer1", "layer1.0.conv1")


def test_typo_suggests_closest_names() -> None:
    with pytest.raises(NoMatchingLayerError, match=r"layer4\.1\.conv2") as info:
        check_keys(["layer4.1.cnv2"], NAMES, "ranks")
    assert isinstance(info.value, ValueError)
    assert "'layer4.1.cnv2'" in str(info.value)


def test_bad_regex_is_an_error() -> None:
    with pytest.raises(NoMatchingLayerError, match="regular expression"):
        check_keys(["re:layer[1"], NAMES, "exclude")


def test_lookup_prefers_exact_then_last_pattern() -> None:
    mapping = {"layer*": 1, "*.conv2": 2, "layer4.1.conv2": None}
    assert lookup(mapping, "layer4.1.conv2") == (True, None)
    assert lookup(mapping, "layer1.0.conv2") == (True, 2)
    assert lookup(mapping, "layer1.0.conv1") == (True, 1)
    assert lookup(mapping, "fc") == (False, None)
