"""Anti-entropy: nodes compare digests of their region state and fetch what they lack.

Every `sync_interval` seconds (an APScheduler job, with jitter against storms) and right
after (re)connecting (then marked `hello`), a node publishes for each region tree it follows
a `digest`: the 16 level-1 hashes of its digest tree (node/digest.py) and, per level-1 node,
how many authored versions and latest-vote rounds it holds. A node whose own digest differs
  - answers by publishing its digest (`answer`; once for the digests that come together,
    and directly to a node that joins after that answer went out), so that the sender and
    everyone else compare too; answers are not answered. The answer waits a moment
    (ANSWER_STEP for each node before it by node id among those it has heard from) and is
    dropped if a node answers first that is in its state, or that holds at least as much
    (versions and vote rounds) in each level-1 node where the digests to answer differ from
    its own (_told: live votes reach the nodes of one state at different moments); a node
    joining soon after is left to the node that answered, which answers it alone;
  - a moment later (SETTLE; JOIN_SETTLE just after its own hello, since others in its
    state may be reconnecting too) decides: pull from a peer that holds something it lacks
    (the counts tell a peer that is only behind), or follow a peer in its own state.
Nodes in one state pull once for all. A node that hears a hello in its own state answers
it directly with `welcome` (and `pulling` when it is pulling for that state). So does a node
pulling, or that pulled lately and keeps what it brought, to a hello in the state its pull
began from (the same versions, with no vote it does not hold: the votes cast on what it
pulled reach the others live meanwhile). A node
follows (sync-req `follow`) a peer pulling for its state, else the first by node id of
itself and the peers seen in its state (unless that is itself); the leader forwards, at
the end of its pull, the envelopes it brought (sync-resp, the last chunk with its digest),
and a leader that itself follows relays what it is forwarded. A follower still behind an
exchange timeout later pulls from the peers that were ahead.

A pull is one exchange at a time per region tree, initiator I and responder R, walking down
the tree where it differs, one level per message:
  sync-req (I -> R) and sync-resp (R -> I) carry `nodes`: [level, index, 16 packed child
  hashes] for nodes that differ and still hold many frames, and `frames`: [level, index,
  [[position, frame hash], ...]] for nodes that differ and hold few. The side holding few
  frames lists them; the other compares frame by frame. Between nodes that say they read
  that (`packed-walks`, node/presence.py), I's requests carry a `salt` drawn for the pull,
  and both sides name every tree node's and frame's hash by 4 bytes of a hash of it with
  that salt (digest.salted): half the bytes, and two hashes that read the same in one pull
  read differently in the next. Their sync-reqs and sync-resps carry all but the region
  and the envelopes deflated (`deflated`, shared/packing.py): the lists of voters and
  rounds repeat from frame to frame.
  - I, seeing frames that differ or that only R holds, lists what it holds of them
    (`items`: [position, 4-byte short hashes of its versions, 4-byte voter tag + round of
    each voter's latest vote]). A frame's history grows with every write, its voters do
    not: of a frame with more than LISTED_VERSIONS versions, I lists the newest ones, from
    generation H on, and says what it holds below H as [H, count, XOR of their item
    hashes] (a fourth element), to a peer whose sync-resps say it reads that (`horizons`);
  - R, seeing frames that differ, asks for I's items (`want`), and sends at once every
    envelope of a frame I does not hold; given items, R sends the versions I lacks and the
    votes newer than I's latest of their voter (each voter's latest, and the ones it moved
    away from that fork choice reads: Voting._compactable). Of items that list from
    generation H on, R sends what I lacks from H on, and compares what it holds below H
    as I said it: not the same (I lacks an old branch, or both sides wrote the frame more
    than that while apart), R asks for more of the list (`deeper`), and I lists DEEPER
    times as many of the frame's versions next (all of them, in the end).
R's envelopes are the original signed diffs and votes, chunked under the message size
limit, the item forms of each batch all among them put back together as that batch for a peer
whose sync-reqs say it reads batches (`batches`: one signature check instead of one per
message, and no paths), and R's own votes among them as batches R signs as it sends them (the
same payloads, so the same messages, under one signature); in short forms for a peer whose
sync-reqs say it reads them (`short`, shared/shortening.py: a vote's version and a diff's
parent by 4 bytes, which I restores from what it holds and from the diffs before them);
packed (`packed`, shared/packing.py: a third to a half of the bytes) for a peer whose
sync-reqs say it reads packs (`packed`), else as a list (`envelopes`). I runs them through
the normal receive path minus the live replay window. What I cannot restore (it holds no
version of the frame with that name, or two) it leaves, asks for full forms for ASK_FORGET,
and pulls again at once (once). The votes of other voters R leaves to them, for an I whose
sync-reqs say it asks (`asks`): a live voter that says it answers (`own-votes`,
node/presence.py) and has at least ASK_MIN to send is named in R's reply with the frames
(`ask`: {voter: [[position, the round I listed for it there, the round of its newest vote R
left], ...]}); I asks each (sync-req `own`: those) and the voter answers with its votes in
between (not those it cast since: they went live) as one batch of
its own signature (sync-resp `own`), which I takes and forwards as part of its pull. A voter
that has not answered ASK_WAIT later is named in I's sync-reqs (`direct`, for ASK_FORGET) and
I pulls again at once: R sends its votes then. R's reply that continues
nothing is marked `last` and carries R's digest; when a step was cut short to stay under the
size limits (`cut`), I pulls again at once from that digest.
Merges are never sent: every node rebuilds them.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeswarm.shared import packing, shortening
from edgeswarm.shared.envelope import EnvelopeError, MalformedError, decode_many, is_relay, rebatch
from edgeswarm.shared.topics import node_topic, region_covers, region_topic, validate_region

from .digest import (FANOUT, FANOUT_BITS, MAX_LEVEL, POS_BITS, SALT_BYTES, SALTED_BYTES, Tree, below, pack, pack_rounds,
                     pack_versions, salted, short, unpack, unpack_rounds, unpack_versions, valid_node, version_item,
                     voter_tag, wire_round)

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("edgeswarm.sync")

LEAF_FRAMES = 16  # a differing tree node holding at most this many frames is listed frame by frame
EXCHANGE_TIMEOUT = 10.0  # seconds without an answer after which a pull is given up
ANSWER_GAP = 2.0  # seconds: digests from several nodes within this get one answer from a node in the same state
ANSWER_STEP = 0.05  # seconds an answer waits for each node before this one by node id
SETTLE = 1.0  # seconds between a differing digest and the decision to pull: the others' digests come meanwhile
JOIN_SETTLE = 1.0  # the same, for a node that (re)joined less than JOINING seconds ago
JOINING = 5.0
MAX_FORWARD = 16  # envelopes kept to forward, in message size limits; a bigger catch-up is not forwarded
MAX_PEERS = 1024  # digests remembered per region tree
MAX_ROOTS = 64  # region trees whose exchange state is kept (a peer may name any number below the followed ones)
MAX_CHANGES = 10_000  # store commits queued for the kept trees before they are dropped instead
PUSH_MESSAGES = 8  # envelopes sent per exchange step, in message size limits; the initiator pulls again for the rest
LISTED_VERSIONS = 4  # versions of a frame an `items` entry lists at first (the newest: see above)
DEEPER = 4  # how many times more of them it lists each time the peer asks for more
ASK_MIN = 4  # votes of one other voter a reply leaves to that voter, at the least (fewer go along)
ASK_WAIT = 2.0  # seconds a voter asked for its votes has to answer before they are asked of others
ASK_FORGET = 120.0  # seconds after which a voter that did not answer is asked again


@dataclass
class _Pull:
    """This node's exchange for one region tree."""
    peer: str
    deadline: float  # monotonic time after which it is given up
    pre: bytes  # this node's level-1 hashes when it began
    pre_counts: list  # and its level-1 counts
    salt: bytes | None  # what its steps' hashes are salted with (digest.salted), for a peer that says it answers that
    cut: bool = False  # a step was cut short: pull again when it ends
    unrestored: bool = False  # some of what it brought could not be restored (_take): pull again, in full forms
    refetched: bool = False  # it is that pull again (once only: a responder that sends short forms anyway is not)
    taken: list[bytes] | None = field(default_factory=list)  # envelopes received, to forward (None: too many)
    size: int = 0
    listed: dict[int, int] = field(default_factory=dict)  # position -> versions its items list, when asked deeper

    def extend(self) -> None:
        self.deadline = time.monotonic() + EXCHANGE_TIMEOUT

    def salted(self, body: dict) -> dict:
        """A step's request, with the pull's salt if it has one."""
        return body if self.salt is None else body | {"salt": self.salt}


@dataclass
class _Seen:
    """A peer's latest digest."""
    hashes: bytes  # level-1 hashes
    counts: list
    at: float  # monotonic time it came
    pulling: bytes | None = None  # the peer is pulling for nodes in this state (see on_digest)
    welcome: bool = False  # it answered this node's hello, or said hello in its state: the two were in one state


class Sync:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = node.store
        self._scheduler = None
        self._lock = threading.Lock()
        self._pulls: dict[str, _Pull] = {}  # root -> the pull under way: one per tree at a time
        # root -> peer -> the latest digest seen from it
        self._seen: dict[str, dict[str, _Seen]] = {}
        self._published: dict[str, tuple[bytes, float]] = {}  # root -> (level-1 hashes, when) last published
        self._spared: dict[str, float] = {}  # root -> when an answer last spared this node's
        self._deferred: dict[str, tuple[float, set[str]]] = {}  # root -> (when this node followed, peers ahead then)
        self._relayed: dict[str, list[bytes] | None] = {}  # root -> envelopes forwarded to this node so far
        self._relaying: dict[str, set[str]] = {}  # root -> the followers of this node sent them from the first
        self._busy: set[str] = set()  # roots where a pull was wanted while another was under way
        self._synced: dict[str, float] = {}  # root -> when an exchange (or a forward) last brought this node up to date
        self._hello = -JOINING  # monotonic time this node last published its digests on (re)joining
        self._followers: dict[str, dict[str, float]] = {}  # root -> peers that wait for this node's pull -> when
        # root -> (when, envelopes, digest, peers sent to, the level-1 hashes and counts before, if its
        # own pull) of what this node forwarded last
        self._forwarded: dict[str, tuple[float, list[bytes], dict | None, set[str], tuple | None]] = {}
        self._deciding: dict[str, threading.Timer] = {}  # root -> the decision to pull scheduled
        self._answering: dict[str, threading.Timer] = {}  # root -> this node's answer, waiting (see _answer_soon)
        self._telling: dict[str, set[int]] = {}  # root -> level-1 nodes where what that answer is for differs
        self._packs: set[str] = set()  # peers whose latest sync-req said they read packed envelopes
        self._batches: set[str] = set()  # peers whose latest sync-req said they read whole batches
        self._horizons: set[str] = set()  # peers whose latest sync-resp said they read items that list the newest
        self._asks: set[str] = set()  # peers whose latest sync-req said they ask voters for their own votes
        self._shorts: set[str] = set()  # peers whose latest sync-req said they read short forms
        self._full_until = 0.0  # monotonic time till which this node asks for full forms (one did not restore)
        # root -> voter asked for its own votes -> [when first, answers still to come] (till they all came)
        self._asked: dict[str, dict[str, list]] = {}
        self._stopped = False
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
        with self._lock:
            self._stopped = True
            timers = [*self._deciding.values(), *self._answering.values()]
            self._deciding, self._answering, self._telling = {}, {}, {}
        for timer in timers:
            timer.cancel()
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

    def publish_digests(self, hello: bool = False) -> None:
        """Publish a digest of every followed region tree, the trace entries recorded since
        the last round and this node's trace head (the scheduled job, which also prunes the
        traces held and compacts the votes of frames decided since; `hello` on
        (re)connecting)."""
        if not hello:
            for what, prune in (("the traces", self.node.trace.prune), ("the votes", self.node.compact_votes)):
                try:
                    prune()
                except Exception:  # (tried again next round)
                    log.exception("pruning %s failed", what)
        self.node.trace.push()
        self.node.trace.publish_head()
        self.node.presence.publish_fingerprint()
        if hello:
            self._hello = time.monotonic()
        for root in self.node.config.regions:
            try:
                self._publish_digest(root, self.tree(root), {"hello": True} if hello else {})
            except Exception:  # a failed round is retried at the next interval
                log.exception("publishing the digest of %s failed", root)

    def _publish_digest(self, root: str, tree: Tree, flags: dict) -> None:
        digest = self.digest(root, tree) | flags
        self._published[root] = (digest["hashes"], time.monotonic())
        self.node.send_now(region_topic("digest", root), "digest", digest, region=root)

    def on_digest(self, env: Any) -> None:
        root, theirs, counts = _parse_digest(env.body)
        if not self._follows(root):
            self.node.counters["ignored.sync-region"] += 1
            return
        body = env.body
        tree = self.tree(root)
        level1 = tree.children(0, 0)
        differing = _differing(level1, theirs)
        pulling = body.get("pulling")
        # (A hello in this node's state: the two are in one state, as when it welcomes this
        # node, though live votes may make their digests differ by the time either decides.)
        self._remember(root, env.sender_id, _Seen(body["hashes"], counts, time.monotonic(),
                                                  pulling if type(pulling) is bytes else None,
                                                  bool(body.get("welcome") or body.get("hello") and not differing)))
        if body.get("answer") and self._told(root, counts, tree, differing):
            self._answered(root)
        if body.get("hello"):
            # A node (re)joining learns from the nodes in its state that they are, and from
            # one pulling for that state that it is (or that pulled lately, and keeps what its
            # pull brought for followers that come late): it leaves the pull to them (_decide).
            with self._lock:
                pull = self._pulls.get(root)
                last = self._forwarded.get(root)
                before = (pull.pre, pull.pre_counts) if pull is not None else last[4] if last is not None else None
            pre = before[0] if before is not None and _from(before, body["hashes"], counts, tree.counts()) else None
            if not differing or pre is not None:
                self._send(env.sender_id, "digest",
                           self.digest(root, tree) | {"answer": True, "welcome": True, "pulling": pre})
                differing = []
        if not differing:
            self.node.counters["sync.in-step"] += 1
            return
        self.node.counters["sync.differing-digests"] += 1
        # Let the sender, and the others, compare with us too: answer a digest published by
        # a round or a (re)connection (never an answer), once for the digests that come
        # together (several nodes reconnecting at once).
        lately = self._published_lately(root)
        if body.get("answer"):
            pass
        elif lately is not None and body.get("hello"):  # it joined after our answer went out: to it alone
            self._send(env.sender_id, "digest", self.digest(root, tree) | {"answer": True})
        elif body.get("hello") and self._spared_lately(root):
            # (it joined after an answer that told what ours would: that node answers it alone)
            self.node.counters["sync.answers-spared"] += 1
        elif lately != pack(level1):
            self._answer_soon(root, differing)
        # A node that has just (re)joined waits longer: others in its state may be joining too
        # (after a network split heals), and the first of them is to pull for all. One that
        # has just been brought up to date waits out the exchange timeout: what differs now
        # is mostly live traffic still on its way.
        now = time.monotonic()
        since = now - self._synced.get(root, -EXCHANGE_TIMEOUT)
        if since < EXCHANGE_TIMEOUT:
            self._schedule(root, EXCHANGE_TIMEOUT - since, waited=True)
        else:
            self._schedule(root, JOIN_SETTLE if now - self._hello < JOINING else SETTLE)

    def _published_lately(self, root: str) -> bytes | None:
        """The level-1 hashes this node published for `root` less than ANSWER_GAP ago, if any."""
        hashes, at = self._published.get(root, (b"", -ANSWER_GAP))
        return hashes if time.monotonic() - at < ANSWER_GAP else None

    def _told(self, root: str, counts: list[list[int]], tree: Tree, differing: list[int]) -> bool:
        """Whether an answer (its counts, and where it differs from this node's digest) tells
        what this node's waiting answer would: it comes from a node in this state, or from
        one that holds at least as much (versions and vote rounds) in each level-1 node where
        the digests this node is to answer differ from its own (live votes reach the nodes of
        one state at different moments: the first to answer may hold a vote this one lacks,
        or lack one this one holds where the joining node needs nothing). Where the answer's
        hash is this node's, so are its counts."""
        with self._lock:
            telling = self._telling.get(root)
        if telling is None or not differing:
            return telling is not None
        return _at_least(counts, tree.counts(), list(telling))

    def _answer_soon(self, root: str, differing: list[int]) -> None:
        """Answer a differing digest with this node's, after waiting ANSWER_STEP for each
        node before it by node id among those it has heard from for the tree, unless a node
        in its state, or one that tells what this one would, answers first (_told,
        _answered): one answer from the nodes of a state, not one from every node (a node
        rejoining a swarm of twenty had all nineteen answer, and each node then compared
        nineteen digests at once, a burst of CPU across the swarm that held up the writes of
        that moment). Random waits (up to 0.2 s, before 0.9.4) let two
        or three of seven nodes in a state answer when their answers took longer than the
        gaps between the waits to reach each other."""
        with self._lock:
            if self._stopped:
                return
            if root in self._answering:
                self._telling[root].update(differing)
                return
            self._telling[root] = set(differing)
            me = self.node.node_id
            before = sum(peer < me for peer in self._seen.get(root, {}))
            timer = self._answering[root] = threading.Timer(before * ANSWER_STEP, self._answer, (root,))
        timer.daemon = True
        timer.start()

    def _spared_lately(self, root: str) -> bool:
        """Whether an answer spared this node's less than half ANSWER_GAP ago: the node that
        gave it answers a node joining within ANSWER_GAP after it to that node alone, with
        its digest as it is then (half: it answered before this node heard it; and the states
        of both may have moved since by the live votes on what the first newcomer pulled, so
        their counts would tell nothing)."""
        with self._lock:
            return time.monotonic() - self._spared.get(root, -ANSWER_GAP) < ANSWER_GAP / 2

    def _answered(self, root: str) -> None:
        with self._lock:
            timer = self._answering.pop(root, None)
            self._telling.pop(root, None)
            if timer is not None:
                self._spared[root] = time.monotonic()
        if timer is not None:
            timer.cancel()
            self.node.counters["sync.answers-spared"] += 1

    def _answer(self, root: str) -> None:
        with self._lock:
            self._telling.pop(root, None)
            if self._answering.pop(root, None) is None or self._stopped:
                return
        try:
            tree = self.tree(root)
            if self._published_lately(root) != pack(tree.children(0, 0)):  # (else its answer is out already)
                self._publish_digest(root, tree, {"answer": True})
                self.node.counters["sync.answers"] += 1
        except Exception:  # (the next differing digest, or round, answers)
            log.warning("answering a digest of %s failed", root, exc_info=True)

    def _remember(self, root: str, peer: str, seen: _Seen) -> None:
        with self._lock:
            peers = self._seen.pop(root, None)
            if peers is None:
                peers = {}
                self._make_room()
            self._seen[root] = peers  # (the tree heard of most recently last)
            peers.pop(peer, None)
            peers[peer] = seen
            while len(peers) > MAX_PEERS:
                del peers[next(iter(peers))]

    def _make_room(self) -> None:
        """(Under the lock.) With MAX_ROOTS trees kept, forget the one heard of least recently
        (never a followed one) and all its exchange state."""
        if len(self._seen) < MAX_ROOTS:
            return
        root = next((r for r in self._seen if r not in self.node.config.regions), None)
        if root is None:
            return
        for state in (self._seen, self._pulls, self._deferred, self._relayed, self._relaying, self._synced,
                      self._followers, self._forwarded):
            state.pop(root, None)
        self._busy.discard(root)
        timer = self._deciding.pop(root, None)
        if timer is not None:
            timer.cancel()

    def _schedule(self, root: str, delay: float, waited: bool = False, sooner: bool = False) -> None:
        """Decide on a pull of `root` in `delay` seconds, unless a decision is already due
        (`sooner`: in place of it)."""
        with self._lock:
            if self._stopped:
                return
            if root in self._deciding:
                if not sooner:
                    return
                self._deciding.pop(root).cancel()
            timer = self._deciding[root] = threading.Timer(delay, self._decide, (root, waited))
        timer.daemon = True
        timer.start()

    def _decide(self, root: str, waited: bool) -> None:
        """A while after a differing digest: pull from a peer that holds something this node
        lacks. Nodes in the same state leave it to one of them (`_leader`), which forwards
        what it receives to the others (`_forward`); they pull themselves only if they still
        lack something an exchange timeout later."""
        with self._lock:
            self._deciding.pop(root, None)
            if self._stopped:
                return
            seen = list(self._seen.get(root, {}).items())
        try:
            tree = self.tree(root)
            level1, counts = tree.children(0, 0), tree.counts()
            mine = pack(level1)
            fresh = time.monotonic() - EXCHANGE_TIMEOUT
            ahead = []  # (what it holds where it differs, peer, its level-1 hashes)
            for peer, their in seen:
                differing = _differing(level1, unpack(their.hashes, FANOUT))
                if differing and not _only_behind(counts, their.counts, differing):
                    ahead.append((_held(their.counts, differing), peer, their.hashes))
            with self._lock:
                deferred = self._deferred.pop(root, None)
            if not ahead and deferred is not None and self._synced.get(root, 0.0) < deferred[0]:
                # Followed a peer, and nothing came: the peers that were ahead then still are,
                # as far as this node knows (their digests since may only look older).
                ahead = [(0, p, their.hashes) for p, their in seen if p in deferred[1]]
            if not ahead:
                return
            if not waited:
                leader = _leader(seen, mine, self.node.node_id, fresh)
                if leader is not None:
                    self.node.counters["sync.deferred"] += 1
                    with self._lock:
                        self._deferred[root] = (time.monotonic(), {p for _, p, _ in ahead})
                    self._request(leader, {"region": root, "follow": True})
                    self._schedule(root, EXCHANGE_TIMEOUT, waited=True)
                    return
            # The peer that holds the most where this node differs (one pull is then most
            # likely to be enough: a node waits out an exchange timeout before the next),
            # any of them when several hold as much.
            most = max(held for held, _, _ in ahead)
            _, peer, hashes = random.choice([a for a in ahead if a[0] == most])
            self._pull(root, peer, tree, hashes)
        except Exception:
            log.exception("deciding on a pull of %s failed", root)

    def _pull(self, root: str, peer: str, tree: Tree, hashes: bytes, carry: _Pull | None = None) -> None:
        """Begin an exchange with a peer whose digest differs, unless an exchange for this
        tree is under way."""
        now = time.monotonic()
        salting = self.node.presence.saying("packed-walks")
        with self._lock:
            current = self._pulls.get(root)
            if current is not None and current.deadline > now:
                self.node.counters["sync.pull-busy"] += 1
                self._busy.add(root)  # decided again when that one ends
                return
            pull = self._pulls[root] = _Pull(peer, now + EXCHANGE_TIMEOUT, pack(tree.children(0, 0)), tree.counts(),
                                             os.urandom(SALT_BYTES) if peer in salting else None)
            if carry is not None:  # a pull going on where one cut short ended
                pull.pre, pull.pre_counts, pull.taken, pull.size = carry.pre, carry.pre_counts, carry.taken, carry.size
                pull.refetched = carry.refetched or carry.unrestored
        self.node.counters["sync.pulls"] += 1
        if pull.salt is not None:  # (the digest's level-1 hashes, as the steps name them)
            hashes = pack(salted(unpack(hashes, FANOUT), pull.salt), SALTED_BYTES)
        nodes, frames, cut = self._compare_nodes(tree, [[0, 0, hashes]], pull.salt)
        pull.cut |= cut
        self._request(peer, pull.salted({"region": root, "nodes": nodes, "frames": frames}))

    def _forward(self, root: str, pull: _Pull) -> None:
        """At the end of a pull: send what it brought to the peers that wait for it (they
        were in the state this node was in), with this node's digest now."""
        if not pull.taken:
            return
        digest = self.digest(root)
        fresh = time.monotonic() - EXCHANGE_TIMEOUT
        with self._lock:
            followers = [p for p, at in self._followers.pop(root, {}).items() if at > fresh and p != pull.peer]
            self._keep_forward(root, pull.taken, digest, followers, (pull.pre, pull.pre_counts))
        for peer in followers:
            self._send_forward(root, peer, pull.taken, digest)

    def _keep_forward(self, root: str, envelopes: list[bytes], digest: dict | None, sent: list[str],
                      pre: tuple[bytes, list] | None = None) -> None:
        """(Under the lock.) Keep what was forwarded for followers that come late, for an
        exchange timeout; each peer gets it once."""
        entry = self._forwarded[root] = (time.monotonic(), envelopes, digest, set(sent), pre)

        def drop() -> None:
            with self._lock:
                if self._forwarded.get(root) is entry:
                    del self._forwarded[root]
        timer = threading.Timer(EXCHANGE_TIMEOUT, drop)
        timer.daemon = True
        timer.start()

    def _send_forward(self, root: str, peer: str, envelopes: list[bytes], digest: dict) -> None:
        chunks = self._chunks(self._shaped(peer, envelopes))
        for i, chunk in enumerate(chunks):
            self._forward_chunk(root, peer, chunk, digest if i == len(chunks) - 1 else None)
        self.node.counters["sync.forwarded"] += 1

    def _forward_chunk(self, root: str, peer: str, envelopes: list[bytes], digest: dict | None) -> None:
        """One sync-resp of forwarded envelopes; the last carries the forwarder's digest."""
        body = {"region": root} | self._carrying(peer, envelopes)
        self._send(peer, "sync-resp", body | {"digest": digest} if digest else body)

    def _relay(self, root: str, envelopes: list[bytes], last: bool
               ) -> tuple[dict[str, list[bytes]], list[bytes] | None]:
        """(Under the lock.) Envelopes a peer forwards to this node go on to the peers that
        follow this node: what each is sent (these, or all so far to one that began following
        after the first of them), and at the last chunk all of them, kept for followers that
        come late."""
        now = time.monotonic()
        buffer = self._relayed.setdefault(root, [])
        if buffer is not None:
            buffer.extend(envelopes)
            if sum(map(len, buffer)) > MAX_FORWARD * self.node.config.max_message_bytes:
                self._relayed[root] = None
        sent = self._relaying.setdefault(root, set())
        out: dict[str, list[bytes]] = {}
        for peer, at in self._followers.get(root, {}).items():
            if at <= now - EXCHANGE_TIMEOUT:
                continue
            if peer in sent:
                out[peer] = envelopes
            elif buffer is not None:  # (else it began too late for this node to have kept it all: it pulls)
                out[peer] = list(buffer)
                sent.add(peer)
        kept = None
        if last:
            self._synced[root] = now
            self._followers.pop(root, None)
            self._relaying.pop(root, None)
            kept = self._relayed.pop(root, None)
        return out, kept

    def _on_follow(self, root: str, peer: str) -> None:
        """A peer in the state this node was in leaves its pull to this node: forward it what
        the pull brings, or brought lately."""
        now = time.monotonic()
        with self._lock:
            if root not in self._seen and root not in self.node.config.regions:  # (one this node told of)
                self.node.counters["ignored.sync-region"] += 1
                return
            last = self._forwarded.get(root)
            if root in self._pulls or last is None:
                followers = self._followers.setdefault(root, {})
                if peer in followers or len(followers) < MAX_PEERS:
                    followers[peer] = now
                return
            if peer in last[3]:  # (once)
                return
            last[3].add(peer)
        self._send_forward(root, peer, last[1], last[2])

    # -- the exchange ----------------------------------------------------------------

    def on_request(self, env: Any) -> None:
        """Responder: answer one step of a peer's pull."""
        root = _region(env.body)
        if not self._follows(root):
            self.node.counters["ignored.sync-region"] += 1
            return
        body = self._inflated(env.body)
        with self._lock:
            _says(self._packs, env.sender_id, body.get("packed") is True)
            _says(self._batches, env.sender_id, body.get("batches") is True)
            _says(self._asks, env.sender_id, body.get("asks") is True)
            _says(self._shorts, env.sender_id, body.get("short") is True)
            asks = env.sender_id in self._asks
        if body.get("follow"):
            self._on_follow(root, env.sender_id)
            return
        tree = self.tree(root)
        their_nodes, their_frames, items, direct = (_list(body, k) for k in ("nodes", "frames", "items", "direct"))
        if any(type(v) is not str for v in direct):
            raise MalformedError("a direct list holds node ids")
        salt = body.get("salt")
        if salt is not None and (type(salt) is not bytes or len(salt) != SALT_BYTES):
            raise MalformedError(f"a salt is {SALT_BYTES} bytes")
        if "own" in body:
            self._answer_own(env.sender_id, root, tree, body["own"])
            return
        # voters whose votes are left to them to send (each signs its own as one batch)
        ask_of = self.node.presence.saying("own-votes") - {env.sender_id, *direct} if asks else set()
        left: dict[str, list[tuple[int, int, int, bytes]]] = {}
        nodes, frames, cut = self._compare_nodes(tree, their_nodes, salt)
        differ, mine_only, _ = self._compare_frames(tree, their_frames, salt)
        wanted: list[_Wanted] = [(pos, set(), {}, None) for pos in mine_only]  # frames the peer does not hold
        for item in items:
            held = unpack_versions(item[1]) if type(item) is list and len(item) in (3, 4) else None
            rounds = unpack_rounds(item[2]) if held is not None else None
            horizon = item[3] if rounds is not None and len(item) == 4 else None
            if rounds is None or type(item[0]) is not int or not (horizon is None or _valid_horizon(horizon)):
                raise MalformedError("an items entry is [position, packed versions, packed voter rounds"
                                     " (, [generation, count, XOR] of those not listed)]")
            wanted.append((item[0], held, rounds, horizon))
        deeper: list[int] = []
        envelopes, more = self._step(self._lacking(tree, wanted, deeper, ask_of, left))
        cut |= more
        ask = {}
        for voter, rows in left.items():
            if len(rows) >= ASK_MIN:  # (each frame with the rounds between which they lie: see _lacking)
                spans: dict[int, list[int]] = {}
                for pos, held, r, _ in rows:
                    span = spans.setdefault(pos, [pos, held, r])
                    span[2] = max(span[2], r)
                ask[voter] = sorted(spans.values())
            else:  # (too few to be worth a message of their own)
                envelopes += [raw for _, _, _, raw in rows]
        self.node.counters["sync.requests-served"] += 1
        self.node.counters["sync.pushed"] += len(envelopes)
        self._send_envelopes(env.sender_id, root, envelopes)
        reply: dict[str, Any] = {"region": root, "nodes": nodes, "frames": frames, "want": differ}
        if deeper:
            reply["deeper"] = deeper
        if not (nodes or frames or differ or deeper):
            reply = {"region": root, "last": True, "digest": self.digest(root, tree)}
        if cut:
            reply["cut"] = True
        if ask:
            reply["ask"] = ask
            self.node.counters["sync.asks-sent"] += len(ask)
        reply["horizons"] = True
        self._send(env.sender_id, "sync-resp", reply)

    def _answer_own(self, peer: str, root: str, tree: Tree, own: Any) -> None:
        """A peer asks for this node's own votes on frames ([position, the round it listed of
        this node there, the round of the newest one its responder left]): those in between go
        to it as one batch of this node's signature."""
        if not _own_list(own):
            raise MalformedError("an own list is [[position, round, round], ...]")
        def votes() -> Iterator[bytes]:  # (not those it cast since the responder looked: they went live)
            for pos, listed, top in own:
                if (frame := tree.frame(pos)) is not None:
                    yield from (raw for _, r, raw in self.store.frame_votes(*frame, self.node.node_id)
                                if listed < wire_round(r) <= top)
        envelopes, _ = self._step(votes())
        self.node.counters["sync.own-answered"] += 1
        self._send_envelopes(peer, root, envelopes, {"own": True}, always=True)

    def on_response(self, env: Any) -> None:
        """Initiator: take the envelopes, and take the next step down or end the pull. (Also
        takes envelopes a peer forwards at the end of its own pull.)"""
        root = _region(env.body)
        if not self._follows(root):  # (a pull is only ever made of a followed tree)
            self.node.counters["ignored.sync-region"] += 1
            return
        body = self._inflated(env.body)
        peer = env.sender_id
        carries = "packed" in body or "envelopes" in body
        raws = carried(body, self.node.config.max_message_bytes)
        taken, whole = self._take(root, raws, peer)
        if "digest" in body:  # the sender's state after this
            root_, _, counts = _parse_digest(body["digest"])
            if root_ == root:
                self._remember(root, peer, _Seen(body["digest"]["hashes"], counts, time.monotonic()))
        if body.get("own") is True:
            if whole:  # (else it counts as not answered: its votes come from a responder in full)
                self._owned(root, peer, [e.raw for e in taken])
            return
        with self._lock:
            pull = self._pulls.get(root)
            ours = pull is not None and pull.peer == peer
            if not ours:  # forwarded: kept to relay only by a node that follows a peer for this tree
                if not carries or root not in self._deferred:
                    self.node.counters["sync.stray"] += 1
                    return
                relayed, kept = self._relay(root, [e.raw for e in taken], "digest" in body)
            elif taken or not whole:
                pull.unrestored |= not whole  # (pulled again as it ends: in full forms, see _take)
                pull.extend()  # still going
                if pull.taken is not None:
                    pull.taken.extend(env.raw for env in taken)
                    pull.size += sum(len(env.raw) for env in taken)
                    if pull.size > MAX_FORWARD * self.node.config.max_message_bytes:
                        pull.taken = None
        if not ours:  # envelopes a peer forwards: on to this node's own followers
            last = "digest" in body
            digest = self.digest(root) if last else None
            if kept:
                with self._lock:
                    self._keep_forward(root, kept, digest, list(relayed))
            for follower, envelopes in relayed.items():
                for i, chunk in enumerate(chunks := self._chunks(self._shaped(follower, envelopes))):
                    self._forward_chunk(root, follower, chunk, digest if i == len(chunks) - 1 else None)
            if last:
                # The pull this node followed ended: what it still lacks (the leader was in
                # its state, or took other changes since) it pulls a moment later, not after
                # the exchange timeout it would wait for a forward that never comes.
                with self._lock:
                    self._deferred.pop(root, None)
                self._schedule(root, SETTLE, waited=True, sooner=True)
            return
        if carries:
            return
        if "ask" in body:
            self._ask(root, body["ask"])
        pull.cut |= bool(body.get("cut"))
        with self._lock:
            _says(self._horizons, peer, body.get("horizons") is True)
        if body.get("last"):
            self._end(root, pull)
            # An exchange cut short (more differed than one step carries): go on at once
            # rather than at the next round. Differences that are only live traffic still
            # in flight are not chased.
            unrestored = pull.unrestored and not pull.refetched
            if pull.cut or unrestored:
                root_, theirs, counts = _parse_digest(body.get("digest"))
                tree = self.tree(root)
                differing = _differing(tree.children(0, 0), theirs)
                if root_ == root and differing and (unrestored or not _only_behind(tree.counts(), counts, differing)):
                    self._pull(root, peer, tree, pack(theirs), carry=pull)
                    return
            self._forward(root, pull)
            return
        tree = self.tree(root)
        nodes, frames, cut = self._compare_nodes(tree, _list(body, "nodes"), pull.salt)
        pull.cut |= cut
        differ, _, theirs_only = self._compare_frames(tree, _list(body, "frames"), pull.salt)
        want, deeper = _list(body, "want"), _list(body, "deeper")
        if any(type(p) is not int for p in want + deeper):
            raise MalformedError("a want or deeper list holds positions")
        for pos in deeper:
            pull.listed[pos] = pull.listed.get(pos, LISTED_VERSIONS) * DEEPER
        newest = peer in self._horizons
        items = [self._items(tree, pos, pull.listed.get(pos, LISTED_VERSIONS) if newest else None)
                 for pos in dict.fromkeys(differ + theirs_only + want + deeper)]
        if not (nodes or frames or items):
            self._end(root, pull)
            self._forward(root, pull)
            return
        pull.extend()
        self._request(peer, pull.salted({"region": root, "nodes": nodes, "frames": frames, "items": items}))

    def _ask(self, root: str, ask: Any) -> None:
        """The responder left some voters' votes to them: ask each for its own votes on the
        frames named, between the round this node had listed for it there and that of the
        newest the responder left (what it would have sent: this node may hold a newer one
        by now, live, which would hide an older one it lacks)."""
        if type(ask) is not dict or len(ask) > MAX_PEERS or any(type(v) is not str or not _own_list(own)
                                                                 for v, own in ask.items()):
            raise MalformedError("an ask is {voter: [[position, round, round], ...]}")
        now = time.monotonic()
        live = self.node.presence.saying("own-votes")
        asking = named = False
        for voter, own in ask.items():
            if voter == self.node.node_id:
                continue
            answers = voter in live
            with self._lock:  # (one that is not a live peer that answers, as far as this node knows: named at once)
                asked = self._asked.setdefault(root, {})
                if voter in asked or len(asked) < MAX_PEERS:
                    asked.setdefault(voter, [now if answers else now - ASK_WAIT - 1, 0])[1] += answers
            if not answers:
                named = True
                continue
            self.node.counters["sync.asked"] += 1
            self._request(voter, {"region": root, "own": own})
            asking = True
        if named:  # (pulled again as this pull ends, naming it)
            self._schedule(root, 0, waited=True, sooner=True)
        if asking:  # (a voter gone without a death yet, or too busy: its votes from a responder then)
            timer = threading.Timer(ASK_WAIT + 0.1, self._unanswered, (root,))
            timer.daemon = True
            timer.start()

    def _unanswered(self, root: str) -> None:
        """ASK_WAIT after asking voters: if one has not answered, pull again (naming it)."""
        if self._direct(root):
            self._schedule(root, 0, waited=True, sooner=True)

    def _owned(self, root: str, peer: str, raws: list[bytes]) -> None:
        """A voter's answer with its own votes (taken already): on with the pull they were
        asked for, to the peers that follow it (or that it was forwarded to, if it ended).
        Answers that this node's leader passes on go on to its own followers."""
        with self._lock:
            asked = self._asked.get(root, {})
            entry = asked.get(peer)
            if entry is None or not entry[1]:  # (a leader passing on the answers it got)
                self.node.counters["sync.own-forwarded"] += 1
                followers = self._relayed_to(root, raws)
            else:
                entry[1] -= 1  # (asked once for each step of a pull that named it)
                if not entry[1]:
                    del asked[peer]
                pull = self._pulls.get(root)
                if pull is None:
                    followers = self._kept_for_late(root, raws)
                else:
                    if pull.taken is not None:
                        pull.taken.extend(raws)
                    followers = []
        for follower in followers:
            self._send_envelopes(follower, root, raws, {"own": True})

    def _relayed_to(self, root: str, raws: list[bytes]) -> list[str]:
        """(Under the lock.) The followers of this node that envelopes its leader passes on
        after its forward go to, kept for those that come late too."""
        if root in self._relaying:  # (the forward still coming)
            if (buffer := self._relayed.get(root)) is not None:
                buffer.extend(raws)
            return list(self._relaying[root])
        if (last := self._forwarded.get(root)) is not None and last[4] is not None:  # (its own pull's)
            return []
        return self._kept_for_late(root, raws)

    def _kept_for_late(self, root: str, raws: list[bytes]) -> list[str]:
        """(Under the lock.) Envelopes added to what this node forwarded last, for followers
        that come late; the peers it was forwarded to, which they go on to."""
        last = self._forwarded.get(root)
        if last is None or not raws:
            return []
        last[1].extend(raws)
        return list(last[3])

    def _direct(self, root: str) -> list[str]:
        """Voters asked for their own votes that did not answer in time: the next responder
        sends their votes itself (forgotten after ASK_FORGET)."""
        now = time.monotonic()
        with self._lock:
            asked = self._asked.get(root, {})
            for voter in [v for v, (at, _) in asked.items() if now - at > ASK_FORGET]:
                del asked[voter]
            return [v for v, (at, _) in asked.items() if now - at > ASK_WAIT]

    def _end(self, root: str, pull: _Pull) -> None:
        with self._lock:
            self._synced[root] = time.monotonic()
            if self._pulls.get(root) is pull:
                del self._pulls[root]
            busy = root in self._busy
            self._busy.discard(root)
        if busy:
            self._schedule(root, SETTLE)

    # -- comparing -------------------------------------------------------------------

    def _compare_nodes(self, tree: Tree, entries: list, salt: bytes | None) -> tuple[list, list, bool]:
        """For each peer node given as its 16 child hashes: this node's view of every child
        that differs, as child hashes again or, when it holds few frames, as its frames;
        and whether some were left out to keep the message under the size limit. Hashes
        both ways are salted with the pull's salt, if it has one (digest.salted)."""
        width = 8 if salt is None else SALTED_BYTES
        nodes: list = []
        frames: list = []
        budget = self.node.config.max_message_bytes // 2
        cut = False
        for entry in entries:
            if type(entry) is not list or len(entry) != 3 or not valid_node(entry[0], entry[1], MAX_LEVEL - 1):
                raise MalformedError("a nodes entry is [level, index, child hashes]")
            level, index = entry[0], entry[1]
            theirs = unpack(entry[2], FANOUT, width)
            if theirs is None:
                raise MalformedError(f"a nodes entry carries {FANOUT} packed hashes")
            mine = salted(tree.children(level, index), salt)
            for j in range(FANOUT):
                if mine[j] == theirs[j]:
                    continue
                if budget <= 0:
                    cut = True
                    continue
                child = (level + 1, index * FANOUT + j)
                if child[0] == MAX_LEVEL or tree.count(*child) <= LEAF_FRAMES:
                    held = tree.frames(*child)
                    frames.append([*child, [list(f) for f in zip(held, salted(list(held.values()), salt))]])
                    budget -= 16 + (12 + width) * len(held)
                else:
                    nodes.append([*child, pack(salted(tree.children(*child), salt), width)])
                    budget -= 16 + width * FANOUT
        return nodes, frames, cut

    @staticmethod
    def _compare_frames(tree: Tree, entries: list, salt: bytes | None) -> tuple[list[int], list[int], list[int]]:
        """Positions of the frames listed by a peer (with hashes salted as in _compare_nodes)
        that differ here, that only this node holds, that only the peer holds."""
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
            for pos, h in zip(mine, salted(list(mine.values()), salt)):
                if pos not in theirs:
                    mine_only.append(pos)
                elif theirs[pos] != h:
                    differ.append(pos)
            theirs_only.extend(p for p in theirs if p not in mine and p >> shift == entry[1])
        return differ, mine_only, theirs_only

    def _items(self, tree: Tree, pos: int, listed: int | None = None) -> list:
        """[position, short hashes of the versions, (voter, round) of the latest votes] this
        node holds of the frame at a position; of more than `listed` versions, the newest
        ones and [generation, count, XOR] of the others (see the module's text)."""
        frame = tree.frame(pos)
        if frame is None:
            return [pos, b"", b""]
        rounds = pack_rounds(self.store.vote_rounds(*frame).items())
        newest = self.store.frame_versions(*frame, newest=listed)
        versions = [v for v, _ in newest]
        if listed is not None and newest:  # (the others' count and XOR from the frame's sum: no history read)
            count, xored = self.store.version_summary(*frame)
            if count > len(versions):
                return [pos, pack_versions(versions), rounds, [newest[0][1], *below(count, xored, versions)]]
        return [pos, pack_versions(versions), rounds]

    def _lacking(self, tree: Tree, wanted: list[_Wanted], deeper: list[int], ask_of: set[str] = frozenset(),
                 left: dict[str, list[tuple[int, int, int, bytes]]] | None = None) -> Iterator[bytes]:
        """The envelopes of the wanted frames (position, versions held, voter rounds held,
        what it holds below the versions listed) that the peer lacks: versions whose short
        hash it did not list, votes newer than the latest round it listed for their voter.
        Read a frame at a time, as they are sent. Of a frame listed from a generation on, only
        versions from there on; one whose older versions are not the same here goes into
        `deeper`, for more of its list. The votes of voters in `ask_of` go into `left`
        instead, with their frame's position, the round the peer listed for their voter and
        their own."""
        for pos, held, rounds, horizon in wanted:
            frame = tree.frame(pos)
            if frame is None:
                continue
            since = 0 if horizon is None else horizon[0]
            versions, votes = self.store.frame_items(*frame, since)
            if since and below(*self.store.version_summary(*frame), [v for v, _ in versions]) != horizon[1:]:
                deeper.append(pos)
            diffs = [raw for v, raw in versions if raw is not None and short(version_item(v)) not in held]
            yield from diffs  # (in generation order: parents first)
            sent = set(diffs)  # (a diff that is its author's vote too goes once)
            for voter, r, raw in votes:
                listed = rounds.get(voter_tag(voter), 0)
                if wire_round(r) <= listed or raw in sent:
                    continue
                if voter in ask_of:
                    left.setdefault(voter, []).append((pos, listed, wire_round(r), raw))
                else:
                    yield raw

    # -- helpers ---------------------------------------------------------------------

    def _follows(self, root: str) -> bool:
        """Only trees this node follows (or parts of them) compare: a digest of a wider tree
        would always differ and pull in regions this node does not keep."""
        return any(region_covers(r, root) for r in self.node.config.regions)

    def _take(self, root: str, raws: list[bytes], peer: str) -> tuple[list[Any], bool]:
        """Take the envelopes of a sync response, the short forms among them restored
        (shared/shortening.py: from the diffs before them in it and from the store, and those
        naming versions that come later in it once those are taken); and whether all were.
        One that cannot be restored is left out, and this node asks for full forms for a
        while (ASK_FORGET)."""
        names = shortening.Names(self.store.versions_named)
        taken, later = self._restored(root, raws, peer, names)
        self._handle(taken)
        left: list[bytes] = []
        if later:
            again, left = self._restored(root, later, peer, names)
            self._handle(again)
            taken += again
        if left:
            self.node.counters["sync.unrestored"] += len(left)
            with self._lock:
                self._full_until = time.monotonic() + ASK_FORGET
        return taken, not left

    def _restored(self, root: str, raws: list[bytes], peer: str, names: shortening.Names
                  ) -> tuple[list[Any], list[bytes]]:
        """The envelopes of the messages whose short forms restore, and the messages whose do not."""
        envelopes: list[Any] = []
        left: list[bytes] = []
        for raw in raws:
            full = shortening.restore(raw, names)
            if full is None:
                left.append(raw)
            else:
                envelopes += self._unwrap(root, full, peer)
        return envelopes, left

    def _handle(self, taken: list[Any]) -> None:
        if taken:
            counters = self.node.counters
            held = counters["known"] + counters["votes.known"]
            counters["sync.envelopes"] += len(taken)  # (counted before what they bring shows)
            self.node.handle_many(taken)
            counters["sync.already-held"] += counters["known"] + counters["votes.known"] - held

    def _unwrap(self, root: str, raw: bytes, peer: str) -> list[Any]:
        """The verified diffs and votes a message in a sync response carries (one, or those of
        a whole batch), or none (counted) if it is not such a message."""
        try:
            if is_relay(raw):
                raise MalformedError("a relay where a message or a batch was expected")
            inners = decode_many(raw, max_bytes=self.node.config.max_message_bytes)
        except EnvelopeError as e:
            self.node._reject(f"sync-{e.reason}", f"in a sync response from {peer}: {e}")
            return []
        for inner in inners:
            if inner.kind not in ("diff", "vote") or inner.region is None or not region_covers(root, inner.region):
                self.node._reject("sync-unexpected", f"a {inner.kind} for {inner.region!r} in a sync of {root!r}")
                return []
        # (this node's own envelopes too: a restored node learns back what it sent before)
        return [inner for inner in map(self.node.unseal, inners) if inner is not None]

    def _step(self, raws: Iterator[bytes]) -> tuple[list[bytes], bool]:
        """The envelopes one exchange step sends (PUSH_MESSAGES size limits' worth), and
        whether more were left for the next."""
        envelopes: list[bytes] = []
        size, limit = 0, PUSH_MESSAGES * self.node.config.max_message_bytes
        for raw in raws:
            if size >= limit:
                return envelopes, True
            envelopes.append(raw)
            size += len(raw)
        return envelopes, False

    def _send_envelopes(self, peer: str, root: str, envelopes: list[bytes], flags: dict | None = None,
                        always: bool = False) -> None:
        """Envelopes to a peer in sync-resps (shaped for it, chunked under the size limit,
        packed if it reads packs), with `flags` in each; one even with none, if `always`."""
        for chunk in self._chunks(self._shaped(peer, envelopes)) or ([[]] if always else []):
            self._send(peer, "sync-resp", {"region": root} | (flags or {}) | self._carrying(peer, chunk))

    def _send(self, peer: str, kind: str, body: dict) -> None:
        self.node.send_now(node_topic(peer, kind), kind, body if kind == "digest" else self._deflated(peer, body))

    def _deflated(self, peer: str, body: dict) -> dict:
        """A sync body with all but its region and envelopes deflated, for a peer that reads
        that (`packed-walks`) when it makes it smaller."""
        rest = {k: v for k, v in body.items() if k not in _OUTSIDE}
        if len(rest) < 2 or peer not in self.node.presence.saying("packed-walks"):
            return body
        if (deflated := packing.deflated_smaller(rest, 16)) is None:
            return body
        return {k: v for k, v in body.items() if k in _OUTSIDE} | {"deflated": deflated}

    def _inflated(self, body: Any) -> Any:
        """A sync body as it was before _deflated."""
        if type(body) is not dict or "deflated" not in body:
            return body
        rest = packing.inflate(body["deflated"], self.node.config.max_message_bytes, "a deflated sync body")
        if type(rest) is not dict or any(k in _OUTSIDE or k == "deflated" for k in rest):
            raise MalformedError("a deflated sync body is a map of what is not its region or envelopes")
        return {k: v for k, v in body.items() if k != "deflated"} | rest

    def _request(self, peer: str, body: dict) -> None:
        """A sync-req, saying that this node reads packed envelopes and whole batches, and
        asks voters for their own votes when told to (naming those that did not answer)."""
        direct = self._direct(body["region"]) if "own" not in body else []
        with self._lock:
            short = time.monotonic() >= self._full_until
        self._send(peer, "sync-req", body | {"packed": True, "batches": True, "asks": True}
                   | ({"short": True} if short else {}) | ({"direct": direct} if direct else {}))

    def _shaped(self, peer: str, envelopes: list[bytes]) -> list[bytes]:
        """Envelopes to send a peer, if it reads batches: with the item forms of each batch
        all among them as that batch (one that takes more than a chunk stays in items), and
        this node's own votes among them as batches it signs now, one signature for each
        chunk's worth instead of one per vote."""
        with self._lock:
            batches, short = peer in self._batches, peer in self._shorts
        if batches:
            envelopes = rebatch(envelopes, self.node.config.max_message_bytes // 2, own=self.node.identity)
        return [shortening.shorten(raw) for raw in envelopes] if short else envelopes

    def _carrying(self, peer: str, envelopes: list[bytes]) -> dict:
        """The part of a sync-resp that carries envelopes to a peer: packed if it reads packs
        (and packing makes them smaller)."""
        with self._lock:
            packs = peer in self._packs
        if packs and (packed := packing.smaller(envelopes)) is not None:
            return {"packed": packed}
        return {"envelopes": envelopes}

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


# (position, short hashes of the versions listed, voter tag -> round, [generation, count, XOR] of those
# below the versions listed or None)
_Wanted = tuple[int, set[bytes], dict[bytes, int], "list[int] | None"]
_OUTSIDE = ("region", "packed", "envelopes")  # what a deflated sync body keeps as it is


def _valid_horizon(horizon: Any) -> bool:
    return type(horizon) is list and len(horizon) == 3 and all(type(x) is int and 0 <= x < 2**63 for x in horizon) \
        and horizon[0] >= 1


def _says(peers: set[str], peer: str, says: bool) -> None:
    """(Under the lock.) Keep in `peers` whether the peer's latest message said it reads
    something (packs, batches, horizons); at most MAX_PEERS are kept, and one left out is
    sent what a node of an earlier release reads."""
    if not says:
        peers.discard(peer)
        return
    if len(peers) >= MAX_PEERS and peer not in peers:
        peers.pop()
    peers.add(peer)


def _region(body: Any) -> str:
    if type(body) is not dict or type(body.get("region")) is not str:
        raise MalformedError("a sync message names its region")
    return validate_region(body["region"])


def _own_list(own: Any) -> bool:
    """Whether a value is [[position, round, round], ...] (an `own` request, an `ask` entry)."""
    return type(own) is list and all(type(e) is list and len(e) == 3 and all(type(x) is int for x in e)
                                     and 0 <= e[1] <= e[2] for e in own)


def carried(body: dict, max_bytes: int) -> list[bytes]:
    """The envelopes a sync-resp carries: packed (to a peer that reads packs, when packing
    makes them smaller), or as they are."""
    raws = packing.unpack(body["packed"], max_bytes) if "packed" in body else _list(body, "envelopes")
    if any(type(raw) is not bytes for raw in raws):
        raise MalformedError("a sync response carries a list of envelopes")
    return raws


def _list(body: dict, name: str) -> list:
    value = body.get(name, [])
    if type(value) is not list:
        raise MalformedError(f"{name} is a list")
    return value


def _differing(mine: list[int], theirs: list[int]) -> list[int]:
    """The level-1 nodes whose hashes (this node's, a peer's digest) differ."""
    return [j for j in range(FANOUT) if mine[j] != theirs[j]]


def _leader(seen: list[tuple[str, _Seen]], mine: bytes, me: str, fresh: float) -> str | None:
    """The peer in this node's state (seen after `fresh`) to leave a pull to, if any: one
    pulling for it, else the first by node id of this node and the peers seen in its state
    (one of the two welcomed the other's hello, or the peer's digest is this node's), None
    when that is this node. Every node in the state picks the same one: nodes that (re)join
    together each welcome the other, and following the one that welcomed it, each followed
    the other and nobody pulled."""
    recent = [(peer, their) for peer, their in seen if their.at > fresh]
    pulling = [p for p, t in recent if t.pulling is not None]
    if pulling:
        return min(pulling)
    first = min([p for p, t in recent if t.welcome or t.hashes == mine] + [me])
    return None if first == me else first


def _from(before: tuple[bytes, list[list[int]]], hashes: bytes, counts: list[list[int]], now: list[list[int]]) -> bool:
    """Whether a peer's digest is in the state a pull of this node's began from (`before`: its
    level-1 hashes and counts), as far as what the pull brings it tells: the same, or the
    same versions with votes between then and now. The votes this node cast on what its pull
    brought, and the others' on what it passed on, reach such a peer live meanwhile."""
    pre, pre_counts = before
    return hashes == pre or all(c[0] == p[0] and c[1] <= n[1] for c, p, n in zip(counts, pre_counts, now))


def _held(counts: list[list[int]], differing: list[int]) -> int:
    """How much a peer holds in the level-1 nodes that differ (versions and vote rounds)."""
    return sum(counts[j][0] + counts[j][1] for j in differing)


def _at_least(theirs: list[list[int]], mine: list[list[int]], nodes: list[int]) -> bool:
    """A peer whose counts are at or above ours in each of these level-1 nodes."""
    return all(theirs[j][0] >= mine[j][0] and theirs[j][1] >= mine[j][1] for j in nodes)


def _only_behind(mine: list[list[int]], theirs: list[list[int]], differing: list[int]) -> bool:
    """A peer whose counts are at or below ours in every differing level-1 node is missing
    things rather than holding things we lack (counts only grow)."""
    return all(theirs[j][0] <= mine[j][0] and theirs[j][1] <= mine[j][1] and theirs[j] != mine[j]
               for j in differing)


def _parse_digest(body: Any) -> tuple[str, list[int], list[list[int]]]:
    root = _region(body)
    hashes = unpack(body.get("hashes"), FANOUT)
    counts = body.get("counts")
    if hashes is None or type(counts) is not list or len(counts) != FANOUT or any(
            type(c) is not list or len(c) != 2 or type(c[0]) is not int or type(c[1]) is not int for c in counts):
        raise MalformedError(f"a digest carries {FANOUT} packed hashes and {FANOUT} [versions, rounds] counts")
    return root, hashes, counts
