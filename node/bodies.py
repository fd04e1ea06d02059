"""Parsing the bodies of diff and vote messages (after the envelope checks)."""

from __future__ import annotations

from typing import Any

from edgeswarm.shared import diff
from edgeswarm.shared.envelope import MalformedError

MAX_KEY_BYTES = 256
# A node votes once per change of its head, so no honest round comes near this; the store
# adds latest rounds up (digest counts), and they must stay integers of 64 bits.
MAX_ROUND = 2**32 - 1


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES or "\x00" in key:
        raise ValueError(f"a frame key is non-empty text of at most {MAX_KEY_BYTES} bytes without NUL")
    return key


def _hash(h: Any, what: str) -> bytes:
    if type(h) is not bytes or len(h) != diff.HASH_BYTES:
        raise MalformedError(f"{what} is a {diff.HASH_BYTES}-byte hash")
    return h


def _merge_parents(body: dict) -> list[bytes] | None:
    merge = body.get("merge")
    if merge is None:
        return None
    if type(merge) is not list or not 2 <= len(merge) <= 64:
        raise MalformedError("merge lists 2 to 64 parent versions")
    return [_hash(h, "a merge parent") for h in merge]


def parse_diff(body: Any) -> tuple[str, bytes | None, bytes, list, list[bytes] | None, int | None]:
    """(key, parent, version, ops, merge parents, round): a diff with a round is also its
    author's vote for its version in that round (node.votes_in_diffs)."""
    if type(body) is not dict or not {"key", "parent", "version", "ops"} <= body.keys() <= {
            "key", "parent", "version", "ops", "merge", "round"}:
        raise MalformedError("a diff body is a map of key, parent, version, ops (and merge, round)")
    key, parent, version, ops = body["key"], body["parent"], body["version"], body["ops"]
    validate_key(key)
    if parent is not None:
        _hash(parent, "parent")
    _hash(version, "version")
    diff.check_ops(ops)
    round_ = body.get("round")
    if round_ is not None:
        _round(round_)
    return key, parent, version, ops, _merge_parents(body), round_


def parse_vote(body: Any) -> tuple[str, bytes, int, list[bytes] | None]:
    if type(body) is not dict or not {"key", "version", "round"} <= body.keys() <= {"key", "version", "round", "merge"}:
        raise MalformedError("a vote body is a map of key, version, round (and merge)")
    key, version, round_ = body["key"], body["version"], body["round"]
    validate_key(key)
    _hash(version, "version")
    _round(round_)
    return key, version, round_, _merge_parents(body)


def _round(round_: Any) -> None:
    if type(round_) is not int or not 1 <= round_ <= MAX_ROUND:
        raise MalformedError("a vote round is a positive integer")
