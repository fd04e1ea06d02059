"""The topic scheme.

Region traffic:   es/v1/<kind>/<region levels...>      e.g. es/v1/diff/plant/line1/vision
Per-node traffic: es/v1/node/<node-id>/<kind>          e.g. es/v1/node/k3x.../birth

On its own node topic a node says who it is and how it is (birth, death, fingerprint,
trace, trace-head); on another node's topic, only what it addresses to that node
(ADDRESSED: a vote for the node's version, digests, sync and trace exchanges).

A region is a topic subtree, so `es/v1/+/plant/line1/#` is one subscription for every kind
of message in the region `plant/line1` and all regions below it.

Region names: 1 to 16 levels separated by `/`, each level 1 to 64 characters, the whole
name at most 256 bytes of UTF-8; no `+`, `#`, `$` (anywhere), NUL, or empty level.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "es/v1"
NODE = "node"
MAX_REGION_LEVELS = 16
MAX_LEVEL_CHARS = 64
MAX_REGION_BYTES = 256
_FORBIDDEN = frozenset("+#$\x00")
KINDS = frozenset({"diff", "vote", "trace", "trace-head", "trace-req", "trace-resp", "digest",
                   "sync-req", "sync-resp", "birth", "death", "fingerprint", "admit", "revoke",
                   "snapshot"})  # (a snapshot is a signed file, never published)
ADDRESSED = frozenset({"vote", "digest", "sync-req", "sync-resp", "trace-req", "trace-resp"})


class TopicError(ValueError):
    """A region, kind or topic that does not follow the topic scheme."""


_VALID_REGIONS: set[str] = set()  # regions checked already (a swarm uses few; every message names one)
_REMEMBERED = 1024


def validate_region(region: str) -> str:
    if type(region) is str and region in _VALID_REGIONS:
        return region
    if not isinstance(region, str) or not region:
        raise TopicError("a region is a non-empty text such as 'plant/line1'")
    if len(region.encode("utf-8")) > MAX_REGION_BYTES:
        raise TopicError(f"region {region[:40]!r}... is longer than {MAX_REGION_BYTES} bytes")
    levels = region.split("/")
    if len(levels) > MAX_REGION_LEVELS:
        raise TopicError(f"region {region!r} has more than {MAX_REGION_LEVELS} levels")
    for level in levels:
        if not level:
            raise TopicError(f"region {region!r} has an empty level")
        if len(level) > MAX_LEVEL_CHARS:
            raise TopicError(f"region {region!r} has a level longer than {MAX_LEVEL_CHARS} characters")
        bad = _FORBIDDEN.intersection(level)
        if bad:
            raise TopicError(f"region {region!r} contains a forbidden character {sorted(bad)[0]!r}")
    if type(region) is str and len(_VALID_REGIONS) < _REMEMBERED:
        _VALID_REGIONS.add(region)
    return region


def validate_kind(kind: str) -> str:
    if kind not in KINDS:
        raise TopicError(f"unknown message kind {kind!r}")
    return kind


def region_topic(kind: str, region: str) -> str:
    return f"{PREFIX}/{validate_kind(kind)}/{validate_region(region)}"


def node_topic(node_id: str, kind: str) -> str:
    validate_region(node_id)
    if "/" in node_id:
        raise TopicError(f"node id {node_id!r} contains '/'")
    return f"{PREFIX}/{NODE}/{node_id}/{validate_kind(kind)}"


def node_filter(node_id: str = "+", kind: str = "+") -> str:
    """A subscription to per-node traffic: every kind addressed to one node, or one kind
    (e.g. trace-head) of every node."""
    if node_id != "+":
        node_topic(node_id, "digest")  # validates the id
    if kind != "+":
        validate_kind(kind)
    return f"{PREFIX}/{NODE}/{node_id}/{kind}"


def region_filter(region: str, kind: str = "+") -> str:
    """The subscription covering `region` and every region below it."""
    if kind != "+":
        validate_kind(kind)
    return f"{PREFIX}/{kind}/{validate_region(region)}/#"


@dataclass(frozen=True)
class Topic:
    kind: str
    region: str | None = None   # set for region traffic
    node_id: str | None = None  # set for per-node traffic


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/", 3)
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise TopicError(f"topic {topic!r} is not under {PREFIX}/")
    if parts[2] == NODE:
        node_parts = parts[3].split("/")
        if len(node_parts) != 2:
            raise TopicError(f"topic {topic!r} is not {PREFIX}/{NODE}/<node-id>/<kind>")
        return Topic(kind=validate_kind(node_parts[1]), node_id=validate_region(node_parts[0]))
    return Topic(kind=validate_kind(parts[2]), region=validate_region(parts[3]))


def region_covers(root: str, region: str) -> bool:
    """True when `region` is `root` or lies below it."""
    return region == root or region.startswith(root + "/")
