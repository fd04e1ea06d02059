"""Anti-entropy: nodes compare digests of their region state and fetch what they lack.

Every `sync_interval` seconds (an APScheduler job, with jitter against storms) and right
after (re)connecting, a node publishes for each region tree it follows a `digest`: the 16
level-1 hashes of its digest tree (node/digest.py) and, per level-1 node, how many authored
versions and latest-vote rounds it holds. A node whose own digest differs
  - pulls from the sender, unless the sender's counts show it is only behind (then the
    sender pulls instead), and
  - answers a published digest with its own, directly, so the sender compares too.

A pull is one exchange at a time per region tree, initiator I and responder R, walking down
the tree where it differs, one level per message:
  sync-req (I -> R) and sync-resp (R -> I) carry `nodes`: [level, index, 16 packed child
  hashes] for nodes that differ and still hold many frames, and `frames`: [level, index,
  [[position, frame hash], ...]] for nodes that differ and hold few. The side holding few
  frames lists them; the other compares frame by frame.
  - I, seeing frames that differ or that only R holds, lists what it holds of them
    (`items`: [position, 4-byte short hashes of its versions, 4-byte voter tag + round of
    each latest vote]);
  - R, seeing frames that differ, asks for I's items (`want`), and sends at once every
    envelope of a frame I does not hold; given items, R sends the versions I lacks and the
    latest votes newer than I's (never an older vote I has already seen replaced).
R's envelopes are the original signed diffs and votes (`envelopes`, chunked under the
message size limit); I runs them through the normal receive path minus the live replay
window. R's reply that continues nothing is marked `last` and carries R's digest; when a step was
cut short to stay under the size limits (`cut`), I pulls again at once from that digest.
Merges are never sent: every node rebuilds them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeswarm.shared.envelope import EnvelopeError, MalformedError, decode
from edgeswarm.shared.topics import node_topic, region_covers, region_topic, validate_region

from .digest import (FANOUT, FANOUT_BITS, MAX_LEVEL, POS_BITS, Tree, pack, pack_rounds, pack_versions, short, unpack,
                     unpack_rounds, unpack_versions, valid_node, version_item, voter_tag, wire_round)

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("edgeswarm.sync")

LEAF_FRAMES = 16  # a differing tree node holding at most this many frames is listed frame by frame
EXCHANGE_TIMEOUT = 10.0  # seconds without an answer after which a pull is given up
MAX_CHANGES = 10_000  # store commits queued for the kept trees before they are dropped instead
PUSH_MESSAGES = 8  # envelopes sent per exchange step, in message size limits; the initiator pulls again for the rest


@dataclass
class _Pull:
    """This node's exchange for one region tree."""
    peer: str
    deadline: float  # monotonic time after which it is given up
    cut: bool = False  # a step was cut short: pull again when it ends

    def extend(self) -> None:
        self.deadline = time.monotonic() + EXCHANGE_TIMEOUT


class Sync:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = node.store
        self._scheduler = None
        self._lock = threading.Lock()
        self._pulls: dict[str, _Pull] = {}  # root -> the pull under way: one per tree at a time
        # The digest tree of each followed root, kept in memory and brought up to date with
        # the store's committed changes to its sums (reading 100k sums for every exchange
        # step would cost more than the step).
        self._trees: dict[str, tuple[int, Tree]] = {}  # root -> (sums generation, tree)
        self._trees_lock = threading.Lock()
        self._changes: list[tuple[int, list | None]] = []
        self._changes_lock = threading.Lock()
        self._tracking = False
        self.store.sum_listeners.append(self._on_sums)

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

    def _on_sums(self, gen: int, changes: list | None) -> None:
        """(Called by the store as it commits, under its lock: only queue them.)"""
        with self._changes_lock:
            if not self._tracking:
                return
            self._changes.append((gen, changes))
            if len(self._changes) > MAX_CHANGES:  # nobody has asked for a tree in a long while
                self._changes = [(gen, None)]
                self._tracking = False

    def tree(self, root: str) -> Tree:
        """This node's digest tree of a region tree, as of now (a copy the caller owns)."""
        with self._trees_lock:
            with self._changes_lock:
                changes, self._changes = self._changes, []
            for gen, batch in changes:
                if batch is None:  # the sums were rebuilt
                    self._trees.clear()
                    continue
                for r, (at, tree) in list(self._trees.items()):
                    if gen > at:
                        for region, pos, item, versions, rounds in batch:
                            if region_covers(r, region):
                                tree.apply(pos, item, versions, rounds)
                        self._trees[r] = (gen, tree)
            if root in self._trees:
                return self._trees[root][1].copy()
            keep = root in self.node.config.regions  # (a peer may name any region below them: not kept)
            if keep:
                with self._changes_lock:
                    self._tracking = True
            gen, tree = self.store.read_sums(root, lambda rows: Tree(rows, lambda p: self.store.frame_at(root, p)))
            if keep:
                self._trees[root] = (gen, tree)
                return tree.copy()
            return tree

    def digest(self, root: str, tree: Tree | None = None) -> dict:
        tree = tree or self.tree(root)
        return {"region": root, "hashes": pack(tree.children(0, 0)), "counts": tree.counts()}

    def publish_digests(self) -> None:
        """Publish a digest of every followed region tree and this node's trace head (the
        scheduled job)."""
        self.node.trace.publish_head()
        self.node.presence.publish_fingerprint()
        for root in self.node.config.regions:
            try:
                self.node.send_now(region_topic("digest", root), "digest", self.digest(root), region=root)
            except Exception:  # a failed round is retried at the next interval
                log.exception("publishing the digest of %s failed", root)

    def on_digest(self, env: Any, direct: bool) -> None:
        root, theirs, counts = _parse_digest(env.body)
        if not self._follows(root):
            return
        tree = self.tree(root)
        differing = _differing(tree, theirs)
        if not differing:
            self.node.counters["sync.in-step"] += 1
            return
        self.node.counters["sync.differing-digests"] += 1
        if not direct:  # let the sender compare with us too (once: never answer a direct digest)
            self.node.send_now(node_topic(env.sender_id, "digest"), "digest", self.digest(root, tree))
        self._pull(root, env.sender_id, tree, theirs, counts, differing)

    def _pull(self, root: str, peer: str, tree: Tree, theirs: list[int], counts: list[list[int]],
              differing: list[int]) -> None:
        """Begin an exchange with a peer whose digest differs, unless it is only behind or
        an exchange for this tree is under way."""
        mine = tree.counts()
        if all(counts[j][0] <= mine[j][0] and counts[j][1] <= mine[j][1] and counts[j] != mine[j]
               for j in differing):
            self.node.counters["sync.peer-behind"] += 1
            return
        now = time.monotonic()
        with self._lock:
            current = self._pulls.get(root)
            if current is not None and current.deadline > now:
                self.node.counters["sync.pull-busy"] += 1
                return
            pull = self._pulls[root] = _Pull(peer, now + EXCHANGE_TIMEOUT)
        self.node.counters["sync.pulls"] += 1
        nodes, frames, cut = self._compare_nodes(tree, [[0, 0, pack(theirs)]])
        pull.cut |= cut
        self._send(peer, "sync-req", {"region": root, "nodes": nodes, "frames": frames})

    # -- the exchange ----------------------------------------------------------------

    def on_request(self, env: Any) -> None:
        """Responder: answer one step of a peer's pull."""
        body = env.body
        root = _region(body)
        if not self._follows(root):
            return
        tree = self.tree(root)
        nodes, frames, cut = self._compare_nodes(tree, _list(body, "nodes"))
        differ, mine_only, _ = self._compare_frames(tree, _list(body, "frames"))
        wanted = [(pos, set(), {}) for pos in mine_only]  # frames the peer does not hold at all
        for item in _list(body, "items"):
            held = unpack_versions(item[1]) if type(item) is list and len(item) == 3 else None
            rounds = unpack_rounds(item[2]) if held is not None else None
            if rounds is None or type(item[0]) is not int:
                raise MalformedError("an items entry is [position, packed versions, packed voter rounds]")
            wanted.append((item[0], held, rounds))
        envelopes: list[bytes] = []
        size, limit = 0, PUSH_MESSAGES * self.node.config.max_message_bytes
        for raw in self._lacking(tree, wanted):
            if size >= limit:
                cut = True
                break
            envelopes.append(raw)
            size += len(raw)
        self.node.counters["sync.requests-served"] += 1
        self.node.counters["sync.pushed"] += len(envelopes)
        for chunk in self._chunks(envelopes):
            self._send(env.sender_id, "sync-resp", {"region": root, "envelopes": chunk})
        reply: dict[str, Any] = {"region": root, "nodes": nodes, "frames": frames, "want": differ}
        if not (nodes or frames or differ):
            reply = {"region": root, "last": True, "digest": self.digest(root, tree)}
        if cut:
            reply["cut"] = True
        self._send(env.sender_id, "sync-resp", reply)

    def on_response(self, env: Any) -> None:
        """Initiator: take the envelopes, and take the next step down or end the pull."""
        body = env.body
        root = _region(body)
        taken = []
        for raw in _list(body, "envelopes"):
            if type(raw) is not bytes:
                raise MalformedError("a sync response carries a list of envelopes")
            inner = self._unwrap(root, raw, env.sender_id)
            if inner is not None:
                taken.append(inner)
        received = len(taken)
        if taken:
            counters = self.node.counters
            held = counters["known"] + counters["votes.known"]
            self.node.handle_many(taken)
            counters["sync.envelopes"] += received
            counters["sync.already-held"] += counters["known"] + counters["votes.known"] - held
        peer = env.sender_id
        with self._lock:
            pull = self._pulls.get(root)
            if pull is None or pull.peer != peer:
                if received == 0 and "envelopes" not in body:
                    self.node.counters["sync.stray"] += 1
                return
            if received:
                pull.extend()  # still going
        if "envelopes" in body:
            return
        pull.cut |= bool(body.get("cut"))
        if body.get("last"):
            with self._lock:
                self._pulls.pop(root, None)
            # An exchange cut short (more differed than one step carries): go on at once
            # rather than at the next round. Differences that are only live traffic still
            # in flight are not chased.
            if pull.cut:
                root_, theirs, counts = _parse_digest(body.get("digest"))
                tree = self.tree(root)
                differing = _differing(tree, theirs)
                if root_ == root and differing:
                    self._pull(root, peer, tree, theirs, counts, differing)
            return
        tree = self.tree(root)
        nodes, frames, cut = self._compare_nodes(tree, _list(body, "nodes"))
        pull.cut |= cut
        differ, _, theirs_only = self._compare_frames(tree, _list(body, "frames"))
        want = _list(body, "want")
        if any(type(p) is not int for p in want):
            raise MalformedError("a want list holds positions")
        items = [self._items(tree, pos) for pos in dict.fromkeys(differ + theirs_only + want)]
        if not (nodes or frames or items):
            with self._lock:
                self._pulls.pop(root, None)
            return
        pull.extend()
        self._send(peer, "sync-req", {"region": root, "nodes": nodes, "frames": frames, "items": items})

    # -- comparing -------------------------------------------------------------------

    def _compare_nodes(self, tree: Tree, entries: list) -> tuple[list, list, bool]:
        """For each peer node given as its 16 child hashes: this node's view of every child
        that differs, as child hashes again or, when it holds few frames, as its frames;
        and whether some were left out to keep the message under the size limit."""
        nodes: list = []
        frames: list = []
        budget = self.node.config.max_message_bytes // 2
        cut = False
        for entry in entries:
            if type(entry) is not list or len(entry) != 3 or not valid_node(entry[0], entry[1], MAX_LEVEL - 1):
                raise MalformedError("a nodes entry is [level, index, child hashes]")
            level, index = entry[0], entry[1]
            theirs = unpack(entry[2], FANOUT)
            if theirs is None:
                raise MalformedError(f"a nodes entry carries {FANOUT} packed hashes")
            mine = tree.children(level, index)
            for j in range(FANOUT):
                if mine[j] == theirs[j]:
                    continue
                if budget <= 0:
                    cut = True
                    continue
                child = (level + 1, index * FANOUT + j)
                if child[0] == MAX_LEVEL or tree.count(*child) <= LEAF_FRAMES:
                    held = tree.frames(*child)
                    frames.append([*child, [[p, h] for p, h in held.items()]])
                    budget -= 16 + 20 * len(held)
                else:
                    nodes.append([*child, pack(tree.children(*child))])
                    budget -= 16 + 8 * FANOUT
        return nodes, frames, cut

    @staticmethod
    def _compare_frames(tree: Tree, entries: list) -> tuple[list[int], list[int], list[int]]:
        """Positions of the frames listed by a peer that differ here, that only this node
        holds, that only the peer holds."""
        differ: list[int] = []
        mine_only: list[int] = []
        theirs_only: list[int] = []
        for entry in entries:
            if type(entry) is not list or len(entry) != 3 or not valid_node(entry[0], entry[1]) or entry[0] < 1 \
                    or type(entry[2]) is not list:
                raise MalformedError("a frames entry is [level, index, [[position, hash], ...]]")
            theirs: dict[int, int] = {}
            for pair in entry[2]:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not int:
                    raise MalformedError("a frame is listed as [position, hash]")
                theirs[pair[0]] = pair[1]
            mine = tree.frames(entry[0], entry[1])
            shift = POS_BITS - FANOUT_BITS * entry[0]
            for pos, h in mine.items():
                if pos not in theirs:
                    mine_only.append(pos)
                elif theirs[pos] != h:
                    differ.append(pos)
            theirs_only.extend(p for p in theirs if p not in mine and p >> shift == entry[1])
        return differ, mine_only, theirs_only

    def _items(self, tree: Tree, pos: int) -> list:
        """[position, short hashes of the versions, (voter, round) of the latest votes] this
        node holds of the frame at a position."""
        frame = tree.frame(pos)
        if frame is None:
            return [pos, b"", b""]
        versions, votes = self.store.frame_items(*frame)
        return [pos, pack_versions(v for v, _ in versions), pack_rounds((voter, r) for voter, r, _ in votes)]

    def _lacking(self, tree: Tree, wanted: list[tuple[int, set[bytes], dict[bytes, int]]]) -> Iterator[bytes]:
        """The envelopes of the wanted frames (position, versions held, voter rounds held)
        that the peer lacks: versions whose short hash it did not list, latest votes newer
        than the round it listed for that voter. Read a frame at a time, as they are sent."""
        for pos, held, rounds in wanted:
            frame = tree.frame(pos)
            if frame is None:
                continue
            versions, votes = self.store.frame_items(*frame)
            yield from (raw for v, raw in versions if raw is not None and short(version_item(v)) not in held)
            yield from (raw for voter, r, raw in votes if wire_round(r) > rounds.get(voter_tag(voter), 0))

    # -- helpers ---------------------------------------------------------------------

    def _follows(self, root: str) -> bool:
        """Only trees this node follows (or parts of them) compare: a digest of a wider tree
        would always differ and pull in regions this node does not keep."""
        return any(region_covers(r, root) for r in self.node.config.regions)

    def _unwrap(self, root: str, raw: bytes, peer: str) -> Any:
        """The verified diff or vote inside a sync response, or None (counted) if it is not one."""
        try:
            inner = decode(raw, max_bytes=self.node.config.max_message_bytes)
        except EnvelopeError as e:
            self.node._reject(f"sync-{e.reason}", f"in a sync response from {peer}: {e}")
            return None
        if inner.kind not in ("diff", "vote") or inner.region is None or not region_covers(root, inner.region):
            self.node._reject("sync-unexpected", f"a {inner.kind} for {inner.region!r} in a sync of {root!r}")
            return None
        if inner.sender == self.node.identity.public_key:
            return None
        return inner

    def _send(self, peer: str, kind: str, body: dict) -> None:
        self.node.send_now(node_topic(peer, kind), kind, body)

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


def _list(body: dict, name: str) -> list:
    value = body.get(name, [])
    if type(value) is not list:
        raise MalformedError(f"{name} is a list")
    return value


def _differing(tree: Tree, theirs: list[int]) -> list[int]:
    """The level-1 nodes whose hashes differ from a peer's digest."""
    mine = tree.children(0, 0)
    return [j for j in range(FANOUT) if mine[j] != theirs[j]]


def _parse_digest(body: Any) -> tuple[str, list[int], list[list[int]]]:
    root = _region(body)
    hashes = unpack(body.get("hashes"), FANOUT)
    counts = body.get("counts")
    if hashes is None or type(counts) is not list or len(counts) != FANOUT or any(
            type(c) is not list or len(c) != 2 or type(c[0]) is not int or type(c[1]) is not int for c in counts):
        raise MalformedError(f"a digest carries {FANOUT} packed hashes and {FANOUT} [versions, rounds] counts")
    return root, hashes, counts
