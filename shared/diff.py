"""Frame diffs and version hashes.

A frame value is a map (or None once the frame is deleted). A diff is a list of operations
  ["set", path, value]   set the value at path, creating intermediate maps
  ["del", path]          remove the key at path (it must exist)
where a path is a list of text keys; the empty path is the whole frame.

A version hash names one state of one frame: BLAKE2b-256 of the canonical CBOR of
[region, key, parent version or null, value]. Anyone holding the parent and the diff can
recompute it, so a diff whose claimed hash does not match is rejected.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .envelope import MalformedError, canonical, check_plain, strict_loads

HASH_BYTES = 32


class DiffError(ValueError):
    """A diff that does not apply to its parent."""


def version_hash(region: str, key: str, parent: bytes | None, value: dict | None) -> bytes:
    return version_hash_of(region, key, parent, canonical(value))


def version_hash_of(region: str, key: str, parent: bytes | None, encoded: bytes) -> bytes:
    """version_hash of a value given as its canonical CBOR (which a node stores too: the
    value is encoded once). The canonical array is its head and its items' encodings."""
    return hashlib.blake2b(b"\x84" + canonical(region) + canonical(key) + canonical(parent) + encoded,
                           digest_size=HASH_BYTES).digest()


def normalize(value: Any) -> Any:
    """The value as every node will decode it (tuples become lists, ...); MalformedError otherwise."""
    return normalize_encoded(value)[0]


def normalize_encoded(value: Any) -> tuple[Any, bytes]:
    """normalize(value), and its canonical CBOR."""
    try:
        data = canonical(value)
    except Exception as e:
        raise MalformedError(f"value cannot be encoded as CBOR: {e}") from None
    return strict_loads(data), data


def check_frame_value(value: Any) -> None:
    if value is not None and type(value) is not dict:
        raise DiffError(f"a frame value is a map, not {type(value).__name__}")


def check_ops(ops: Any) -> None:
    """Raise DiffError unless `ops` is a well-formed list of operations."""
    if type(ops) is not list or not ops:
        raise DiffError("a diff is a non-empty list of operations")
    for op in ops:
        if type(op) is not list or not op or op[0] not in ("set", "del"):
            raise DiffError(f"unknown diff operation {op!r:.60}")
        if len(op) != (3 if op[0] == "set" else 2):
            raise DiffError(f"diff operation {op[0]!r} has {len(op)} elements")
        path = op[1]
        if type(path) is not list or any(type(p) is not str for p in path):
            raise DiffError("a diff path is a list of text keys")
        if op[0] == "del" and not path:
            raise DiffError("'del' needs a non-empty path; delete a frame by setting it to null")
        if op[0] == "set":
            try:
                check_plain(op[2], depth=len(path))  # (the frame value stays within MAX_DEPTH)
            except MalformedError as e:
                raise DiffError(str(e)) from None
            if not path:
                check_frame_value(op[2])


def apply(value: dict | None, ops: list, checked: bool = False) -> dict | None:
    """The value after applying `ops` to `value` (`checked`: by check_ops already, as a
    received diff's are). Neither `value` nor the operations are changed: the maps on the
    paths the operations change are copied, and the result shares everything else with them
    (values are never changed in place: a node keeps them as they are stored, and reads
    them again for the next change)."""
    if not checked:
        check_ops(ops)
    result = value
    made: dict[int, dict] = {}  # the maps this call made (changed in place from then on), by id
    for op in ops:
        path = op[1]
        if not path:
            result, made = op[2], {}
            continue
        if result is None:
            if op[0] == "del":
                raise DiffError(f"cannot delete {'/'.join(path)!r} from a deleted frame")
            result = {}
            made = {id(result): result}
        elif id(result) not in made:
            result = dict(result)
            made[id(result)] = result
        target = result
        for i, k in enumerate(path[:-1]):
            nxt = target.get(k)
            if nxt is None and op[0] == "set":
                nxt = target[k] = {}
                made[id(nxt)] = nxt
            elif type(nxt) is dict and id(nxt) not in made:
                nxt = target[k] = dict(nxt)
                made[id(nxt)] = nxt
            if type(nxt) is not dict:
                raise DiffError(f"path {'/'.join(path[:i + 1])!r} is not a map")
            target = nxt
        if op[0] == "set":
            target[path[-1]] = op[2]
        elif path[-1] in target:
            del target[path[-1]]
        else:
            raise DiffError(f"cannot delete missing key {'/'.join(path)!r}")
    return result


def _same(a: Any, b: Any) -> bool:
    # 1, 1.0 and True are equal in Python but encode differently; compare encodings.
    return type(a) is type(b) and (a == b if type(a) in (str, bytes, int) else canonical(a) == canonical(b))


def make(old: dict | None, new: dict | None) -> list:
    """The operations that turn `old` into `new` (an empty list when they are the same)."""
    if type(old) is not dict or type(new) is not dict:
        return [] if _same(old, new) else [["set", [], new]]
    ops: list = []
    _diff_maps(old, new, [], ops)
    return ops


def _diff_maps(old: dict, new: dict, path: list, ops: list) -> None:
    for k in old:
        if k not in new:
            ops.append(["del", path + [k]])
    for k, v in new.items():
        if k not in old:
            ops.append(["set", path + [k], v])
        elif type(v) is dict and type(old[k]) is dict:
            _diff_maps(old[k], v, path + [k], ops)
        elif not _same(old[k], v):
            ops.append(["set", path + [k], v])


# -- three-way merge ---------------------------------------------------------------------

class MergeConflict(ValueError):
    """Concurrent changes that touch the same place differently."""


def merge_hash(region: str, key: str, parents: list[bytes], value: dict | None) -> bytes:
    """The version hash of a merge: like version_hash, with the sorted list of parents."""
    return hashlib.blake2b(canonical([region, key, sorted(parents), value]), digest_size=HASH_BYTES).digest()


def _related(p: list, q: list) -> bool:
    n = min(len(p), len(q))
    return p[:n] == q[:n]


def merge(base: dict | None, sides: list[dict | None]) -> dict:
    """The value that combines every side's changes relative to `base` (their common ancestor).

    Changes may overlap only where they are identical; otherwise MergeConflict. A side that
    deleted the frame conflicts with any other change. The result does not depend on the
    order of `sides`.
    """
    base = base if base is not None else {}
    taken: list[list] = []
    for side in sides:
        if side is None:
            raise MergeConflict("one side deleted the frame")
        for op in make(base, side):
            for other in taken:
                if _related(op[1], other[1]) and not (op[1] == other[1] and _same(op, other)):
                    raise MergeConflict(f"both sides change {'/'.join(op[1]) or 'the whole frame'!r}")
            if not any(op[1] == other[1] for other in taken):
                taken.append(op)
    # Disjoint operations commute; apply in a canonical order anyway.
    taken.sort(key=lambda op: canonical(op[1]))
    return apply(base, taken) if taken else base
