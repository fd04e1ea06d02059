"""Coherence checks: what a frame value must satisfy before a node publishes or votes for it.

Two kinds of validator, run in order for the frame's region and the regions above it:
- declarative rules from the configuration:
      [[rules]]
      region = "plant/line1"          # this region and every region below it
      keys = "pump-*"                 # frame keys it applies to (glob; default every key)
      required = ["rpm"]
      types = { rpm = "int", on = "bool", note = "text" }
  types: int, float, number, text, bytes, bool, map, list, null.
- Python callables registered with `Node.add_validator(fn, region)`: `fn(region, key, value)`
  returns None when the value is acceptable, or a short reason text.
A deleted frame (value None) is always coherent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeswarm.shared.topics import TopicError, region_covers, validate_region

Validator = Callable[[str, str, dict], "str | None"]

TYPES: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: type(v) is int,
    "float": lambda v: type(v) is float,
    "number": lambda v: type(v) in (int, float),
    "text": lambda v: type(v) is str,
    "bytes": lambda v: type(v) is bytes,
    "bool": lambda v: type(v) is bool,
    "map": lambda v: type(v) is dict,
    "list": lambda v: type(v) is list,
    "null": lambda v: v is None,
}


class CoherenceError(ValueError):
    """A change that fails a coherence check (raised to the writer; nothing is stored)."""


@dataclass(frozen=True)
class Rule:
    region: str
    keys: str = "*"
    required: tuple[str, ...] = ()
    types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Any) -> Rule:
        """Build a rule from a [[rules]] table; ValueError with the reason otherwise."""
        if not isinstance(data, dict):
            raise ValueError("each [[rules]] entry is a table")
        unknown = set(data) - {"region", "keys", "required", "types"}
        if unknown:
            raise ValueError(f"unknown rule setting(s) {', '.join(sorted(unknown))}")
        try:
            region = validate_region(data.get("region"))
        except TopicError as e:
            raise ValueError(f"rules.region: {e}") from None
        keys = data.get("keys", "*")
        required = data.get("required", [])
        types = data.get("types", {})
        if not isinstance(keys, str):
            raise ValueError("rules.keys is a glob pattern such as 'pump-*'")
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise ValueError("rules.required is a list of key names")
        if not isinstance(types, dict) or any(t not in TYPES for t in types.values()):
            raise ValueError(f"rules.types maps key names to one of {', '.join(TYPES)}")
        return cls(region, keys, tuple(required), dict(types))

    def check(self, region: str, key: str, value: dict) -> str | None:
        if not region_covers(self.region, region) or not fnmatch.fnmatchcase(key, self.keys):
            return None
        for name in self.required:
            if name not in value:
                return f"missing required key {name!r}"
        for name, type_name in self.types.items():
            if name in value and not TYPES[type_name](value[name]):
                return f"{name!r} must be {type_name}, not {type(value[name]).__name__}"
        return None


class Coherence:
    """The validators of one node."""

    def __init__(self, rules: list[Rule] | None = None) -> None:
        self._validators: list[tuple[str | None, Validator]] = [(r.region, r.check) for r in rules or []]

    def add(self, fn: Validator, region: str | None = None) -> None:
        if region is not None:
            validate_region(region)
        self._validators.append((region, fn))

    def check(self, region: str, key: str, value: dict | None) -> str | None:
        """None when the value is coherent, else the first failing validator's reason."""
        if value is None:
            return None
        for scope, fn in self._validators:
            if scope is not None and not region_covers(scope, region):
                continue
            try:
                reason = fn(region, key, value)
            except Exception as e:  # a broken validator rejects rather than crashes the node
                reason = f"validator {getattr(fn, '__name__', fn)!r} failed: {e}"
            if reason:
                return str(reason)
        return None
