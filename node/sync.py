"""Anti-entropy: nodes compare digests of their region state and fetch what they lack.

Every `sync_interval` seconds (an APScheduler job, with jitter against storms) a node
publishes, for each region tree it follows, a `digest`: the frames are spread over
BUCKETS buckets by a hash of (region, key), and each bucket's value is the XOR of a short
hash of every authored version and every latest vote in it. A node receiving a digest that
differs from its own
  - asks the sender for the differing buckets (`sync-req` on the sender's node topic),
    listing the versions and latest vote rounds it holds there, and
  - answers with its own digest on the sender's node topic, so the sender pulls too.
The answer (`sync-resp`) carries the original signed diff and vote envelopes the asker
lacks, in chunks under the message size limit; the asker runs them through the normal
receive path (signatures, hashes, coherence, votes) minus the live replay window: a
version or a (voter, round) already held is recognised as such.
Merges are never sent: every node rebuilds them.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from edgeswarm.shared.envelope import EnvelopeError, MalformedError, decode
from edgeswarm.shared.topics import node_topic, region_covers, region_topic, validate_region

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("edgeswarm.sync")

BUCKETS = 64


def bucket_of(region: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{region}\0{key}".encode(), digest_size=4).digest(), "big") % BUCKETS


def _h8(*parts: Any) -> int:
    data = "\0".join(p.hex() if isinstance(p, bytes) else str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Sync:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = node.store
        self._scheduler = None

    # -- schedule --------------------------------------------------------------------

    def start(self, interval: float, snapshot_interval: float = 0) -> None:
        """Schedule the anti-entropy rounds and the snapshots (an interval of 0: never)."""
        if self._scheduler is not None or (interval <= 0 and snapshot_interval <= 0):
            return
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(daemon=True)
        if interval > 0:
            self._scheduler.add_job(self.publish_digests, "interval", seconds=interval, jitter=interval / 5,
                                    max_instances=1, coalesce=True, id="anti-entropy")
        if snapshot_interval > 0:
            self._scheduler.add_job(self.node.snapshot, "interval", seconds=snapshot_interval,
                                    max_instances=1, coalesce=True, id="snapshot")
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    # -- digests ---------------------------------------------------------------------

    def _state(self, root: str) -> tuple[list[tuple], list[tuple]]:
        """(authored versions, latest votes) of a region tree: one read for what a round needs."""
        return self.store.authored_versions(root), self.store.latest_under(root)

    def digest(self, root: str, state: tuple[list[tuple], list[tuple]] | None = None) -> list[int]:
        versions, votes = state or self._state(root)
        buckets = [0] * BUCKETS
        for region, key, version in versions:
            buckets[bucket_of(region, key)] ^= _h8(version)
        for region, key, voter, round_, version in votes:
            buckets[bucket_of(region, key)] ^= _h8(voter, round_, version)
        return buckets

    def publish_digests(self) -> None:
        """Publish a digest of every followed region tree and this node's trace head (the
        scheduled job)."""
        self.node.trace.publish_head()
        self.node.presence.publish_fingerprint()
        for root in self.node.config.regions:
            try:
                self.node.send_now(region_topic("digest", root), "digest", {"region": root, "buckets": self.digest(root)},
                                   region=root)
            except Exception:  # a failed round is retried at the next interval
                log.exception("publishing the digest of %s failed", root)

    # -- handling --------------------------------------------------------------------

    def on_digest(self, env: Any, direct: bool) -> None:
        body = env.body
        root = _region(body)
        buckets = body.get("buckets")
        if type(buckets) is not list or len(buckets) != BUCKETS or any(type(b) is not int for b in buckets):
            raise MalformedError(f"a digest has {BUCKETS} integer buckets")
        # Only trees this node follows (or parts of them) compare: a digest of a wider tree
        # would always differ and pull in regions this node does not keep.
        if not any(region_covers(r, root) for r in self.node.config.regions):
            return
        state = self._state(root)
        mine = self.digest(root, state)
        differing = [i for i in range(BUCKETS) if mine[i] != buckets[i]]
        if not differing:
            self.node.counters["sync.in-step"] += 1
            return
        self.node.counters["sync.differing-digests"] += 1
        have, latest = self._holdings(state, set(differing))
        peer = env.sender_id
        self.node.send_now(node_topic(peer, "sync-req"), "sync-req",
                           {"region": root, "buckets": differing, "have": have, "latest": latest})
        self.node.counters["sync.requests-sent"] += 1
        if not direct:  # let the sender compare with us too (once: never answer a direct digest)
            self.node.send_now(node_topic(peer, "digest"), "digest", {"region": root, "buckets": mine})

    def on_request(self, env: Any) -> None:
        body = env.body
        root = _region(body)
        wanted = body.get("buckets")
        have, latest = body.get("have"), body.get("latest")
        if (type(wanted) is not list or any(type(b) is not int or not 0 <= b < BUCKETS for b in wanted)
                or type(have) is not list or type(latest) is not list):
            raise MalformedError("a sync request lists buckets, versions held and latest vote rounds")
        wanted_set = set(wanted)
        they_have = {h for h in have if type(h) is bytes}
        their_rounds: dict[tuple, int] = {}
        for item in latest:
            if type(item) is list and len(item) == 4 and type(item[3]) is int:
                their_rounds[tuple(item[:3])] = item[3]
        envelopes: list[bytes] = []
        for region, key, version in self.store.authored_versions(root):
            if bucket_of(region, key) in wanted_set and version not in they_have:
                raw = self.store.diff_envelope(version)
                if raw is not None:
                    envelopes.append(raw)
        for region, key, voter, round_, _ in self.store.latest_under(root):
            if bucket_of(region, key) in wanted_set and their_rounds.get((voter, region, key), 0) < round_:
                raw = self.store.vote_envelope(region, key, voter, round_)
                if raw is not None:
                    envelopes.append(raw)
        self.node.counters["sync.requests-served"] += 1
        for chunk in self._chunks(envelopes):
            self.node.send_now(node_topic(env.sender_id, "sync-resp"), "sync-resp", {"region": root, "envelopes": chunk})

    def on_response(self, env: Any) -> None:
        body = env.body
        root = _region(body)
        envelopes = body.get("envelopes")
        if type(envelopes) is not list or any(type(e) is not bytes for e in envelopes):
            raise MalformedError("a sync response carries a list of envelopes")
        for raw in envelopes:
            try:
                inner = decode(raw, max_bytes=self.node.config.max_message_bytes)
            except EnvelopeError as e:
                self.node._reject(f"sync-{e.reason}", f"in a sync response from {env.sender_id}: {e}")
                continue
            if inner.kind not in ("diff", "vote") or inner.region is None or not region_covers(root, inner.region):
                self.node._reject("sync-unexpected", f"a {inner.kind} for {inner.region!r} in a sync of {root!r}")
                continue
            if inner.sender == self.node.identity.public_key:
                continue
            self.node.counters["sync.envelopes"] += 1
            self.node.handle(inner)

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _holdings(state: tuple[list[tuple], list[tuple]], buckets: set[int]) -> tuple[list[bytes], list[list]]:
        versions, votes = state
        have = [v for r, k, v in versions if bucket_of(r, k) in buckets]
        latest = [[voter, r, k, round_] for r, k, voter, round_, _ in votes if bucket_of(r, k) in buckets]
        return have, latest

    def _chunks(self, envelopes: list[bytes]) -> list[list[bytes]]:
        limit = self.node.config.max_message_bytes // 2
        chunks: list[list[bytes]] = []
        size = limit + 1
        for raw in envelopes:
            if size + len(raw) > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(raw)
            size += len(raw) + 8
        return chunks


def _region(body: Any) -> str:
    if type(body) is not dict or type(body.get("region")) is not str:
        raise MalformedError("a sync message names its region")
    return validate_region(body["region"])
