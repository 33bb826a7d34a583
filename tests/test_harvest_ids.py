"""DigestSet: the compact id set behind resume, the store writer and the prompts reader."""

from __future__ import annotations

import secrets

import pytest

from pipeline.harvest_ids import DigestSet, id_key


def test_request_id_key_is_its_value() -> None:
    request_id = "0123456789abcdef0123456789abcdef"
    assert id_key(request_id) == int(request_id, 16)


def test_other_strings_get_distinct_keys() -> None:
    keys = {id_key(value) for value in ["a", "b", "A", "0123456789ABCDEF0123456789ABCDEF", "", "é"]}
    assert len(keys) == 6


@pytest.mark.parametrize("merge_every", [1, 3, 1000])
def test_membership_across_merges(merge_every: int) -> None:
    ids = [secrets.token_hex(16) for _ in range(500)] + ["prompt-1", "line:7"]
    found = DigestSet(ids, merge_every=merge_every)
    assert all(value in found for value in ids)
    assert not any(secrets.token_hex(16) in found for _ in range(500))
    assert "prompt-2" not in found
    assert len(found) == len(ids)


def test_repeated_adds_count_once() -> None:
    found = DigestSet(merge_every=2)
    for value in ["a", "b", "a", "c", "a", "b"]:
        found.add(value)
    assert len(found) == 3


def test_non_string_is_not_member() -> None:
    found = DigestSet(["1"])
    assert 1 not in found
    assert None not in found


def test_keys_sharing_high_half() -> None:
    # Same first 16 hex digits: the lookup must compare the low halves too.
    first = "ffffffffffffffff0000000000000001"
    second = "ffffffffffffffff0000000000000002"
    found = DigestSet([first], merge_every=1)
    found.add("ffffffffffffffff0000000000000003")
    assert first in found
    assert second not in found


def test_invalid_merge_every() -> None:
    with pytest.raises(ValueError, match="merge_every"):
        DigestSet(merge_every=0)
