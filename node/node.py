"""Node: one peer of the swarm, and the public Python API.

    from edgeswarm.node import Node, Config
    with Node(Config(home="/var/lib/edgeswarm", regions=["plant/line1"])) as node:
        v = node.put("plant/line1", "conveyor", {"speed": 1.2})
        node.patch("plant/line1", "conveyor", set={("limits", "max"): 2.0})
        node.get("plant/line1", "conveyor")

Write path: read the head, make the diff, check coherence, store the new version and the
signed envelope in one transaction with the vote it causes (both stay in the outbox until
the broker acknowledges them), publish. Receive path: decode (size, shape, signature,
topic), replay window, then for a diff: parent lookup (missing: kept pending), apply,
version hash, coherence, store; for a vote: equivocation check, store. Either way the
voter then recomputes the frame's head and consensus and this node votes for its new head
(sent to the head's author, which passes the votes on: relay.py).
A message that fails any step is counted by reason and never raises out of the receive loop.

Messages are taken off the network thread into an inbox and handled by one worker thread,
consecutive diffs and votes in one transaction: the network thread acknowledges and
queues, so a long sync response never holds back acknowledgements (amqtt drops a QoS 1
delivery it waited 5 s for) or keepalives. (A lone small diff that finds the inbox empty,
the worker idle and the store free is handled in the network thread at once: see
_on_message.) The worker takes the swarm's live traffic (diffs, votes, presence) first and
the bulk that rounds bring (digests, sync exchanges, trace copies) one message at a time
when nothing live waits: a write never queues behind a round's worth of trace entries from
every peer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, NamedTuple

from edgeswarm.shared import diff
from edgeswarm.shared.clock import PLAUSIBLE_WALL_MS, HybridClock, wall_ms
from edgeswarm.shared.envelope import (Envelope, EnvelopeError, MalformedError, accept_seq, batch_items, canonical,
                                       decode_many, decode_relay, fitting, is_relay, prepare, signed, signed_length)
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.roster import RosterError
from edgeswarm.shared.sealing import SEALED_KINDS, Seals, SealError, is_sealed
from edgeswarm.shared.topics import (NODE, PREFIX, node_filter, parse_topic, region_covers,
                                     region_filter, region_topic, validate_region)

from . import restart
from .admission import Admission
from .handover import Handover
from .coherence import Coherence, CoherenceError, Validator
from .config import Config, ConfigError
from .bodies import parse_diff, parse_vote, validate_key
from .store import Frame, FrameVersion, Out, Queued, Store, StoreFullError
from .presence import Presence
from .relay import Relay
from .sync import Sync
from .trace import Trace
from .transport import Transport, TransportError
from .voting import Voting

log = logging.getLogger("edgeswarm.node")

OUTBOX_WINDOW = 500  # backlog envelopes in flight at once
# Seconds acknowledged outbox rows wait for the next transaction to delete them along with
# what it writes, before one of their own does (see _on_ack).
ACK_CLEAR_AFTER = 1.0
# Room a change leaves below node.max_message_bytes: a pull carries it inside a signed sync
# response, and a receiver keeps one that came in a batch with its path (up to ~400 bytes).
PULL_ROOM = 2048
INBOX_SIZE = 10_000  # messages received and not yet handled; beyond, the network thread waits
INBOX_BATCH = 500  # messages handled in one go by the worker
_WAKE = ("", b"")  # in the inbox: acknowledgements to clear, or votes to time (see wake)
# Handled when no live message waits (see _work): what anti-entropy rounds bring.
_LATER = frozenset({"digest", "sync-req", "sync-resp", "trace", "trace-head", "trace-req", "trace-resp"})
_DIFFS = f"{PREFIX}/diff/"  # (the topics of live diffs)
INLINE_BYTES = 4096  # a diff up to this size may be handled in the network thread (see _on_message)
_ROUND_WINDOW = "round"  # the replay window of a sender's kinds in _LATER: "<node id>/round"


def _later(topic: str) -> bool:
    """A message of a kind in _LATER, told by its topic (es/v1/<kind>/<region> or
    es/v1/node/<id>/<kind>; asked twice of every message, so the topic is not validated
    here: a topic that is not the swarm's is handled at once, where it is rejected)."""
    parts = topic.split("/")
    return len(parts) > 3 and parts[0] + "/" + parts[1] == PREFIX and (
        parts[-1] if parts[2] == NODE else parts[2]) in _LATER

KeyPath = tuple[str, ...] | list[str] | str
Callback = Callable[[FrameVersion], None]


class _Change(NamedTuple):
    """A change this node made, to sign (at once, or as its batch ends)."""
    region: str
    key: str
    body: dict
    parent: bytes | None
    version: bytes
    hlc: int


def _path(p: KeyPath) -> list[str]:
    parts = [p] if isinstance(p, str) else list(p)
    if not parts or any(not isinstance(k, str) for k in parts):
        raise ValueError(f"a path is a key or a tuple of keys, not {p!r}")
    return parts


class Node(Voting):
    def __init__(self, config: Config, *, identity: Identity | None = None, client_tag: str = "") -> None:
        self.config = config
        self.identity = identity or Identity.load_or_create(config.key_path)
        self.node_id = self.identity.node_id
        self.store = Store(config.store_path)
        if restart.after_boot(self.store, self.node_id):
            log.warning("first start in this boot: numbering messages, trace entries and vote rounds anew, "
                        "above what commits lost to a power cut can have used")
        self.clock = HybridClock(self.store.meta("hlc"))
        self.round_floor = self.store.meta("round_floor")  # own vote rounds start above it (restart.py)
        self.coherence = Coherence(config.rules)
        self.counters: Counter[str] = Counter()
        self._static_members = frozenset(config.members) if config.members else None
        self.admission = Admission(self)
        try:
            self.seals = Seals(config.sealed_keys())
        except ValueError as e:
            raise ConfigError(f"swarm.sealed: {e}") from None
        self._subscribers: list[tuple[str | None, Callback]] = []
        self._sub_lock = threading.Lock()
        self._acks = threading.Condition()
        self._activity = threading.Condition()
        self._inflight: set[int] = set()  # outbox seqs handed to the broker (alone or batched), not acked
        self._acked: list[int] = []  # acknowledged, still in the outbox table
        self._ack_due = 0.0  # monotonic time by which the acknowledged rows are deleted
        self._draining = False  # the outbox backlog is being sent (see _drain)
        # What the open transaction sends, (topic, message) prepared, signed as it commits
        # (_seal: the messages for one topic under one signature) into `_outs`, to publish
        # once it has; and the own diffs and votes stored with them (their envelopes then).
        self._sends: list[tuple[str, Envelope]] = []
        self._outs: list[Out] = []
        self._own_diffs: dict[bytes, tuple] = {}  # msg_id -> the diffs row but its envelope
        self._own_votes: dict[bytes, tuple[str, str, int]] = {}  # msg_id -> (region, key, round) of a vote
        self._events: list[FrameVersion] = []
        self._addressed: set[bytes] | frozenset[bytes] = frozenset()  # votes of this _take sent to this node
        self._deferred: dict[tuple[str, str], None] | None = None  # frames to decide (see handle_many)
        self._batched: dict[tuple[str, str], Frame] | None = None  # frames a batch wrote, as they were before it
        self._changes: list[_Change] = []  # the batch's changes, to sign as it ends
        # frame -> its single leaf, as the last decision on it found (Voting._after_writes);
        # forgotten as a transaction rolls back and as a node is excluded
        self._linear: dict[tuple[str, str], bytes] = {}
        self.store.end_listeners.append(lambda committed: committed or self._rolled_back())
        self.store.commit_listeners.append(self._seal)
        self._tx_depth = 0  # nesting of _transaction in the thread holding the store lock
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(INBOX_SIZE)
        self._working = threading.Lock()  # held while messages are handled (by the worker, or inline)
        self._queue_lock = threading.Lock()
        self._queued = 0  # live messages in the inbox or the worker's hands (a diff waits behind them)
        self._worker: threading.Thread | None = None
        self._handled_at = time.monotonic()  # when the inbox worker last finished a batch
        client_id = f"es-{self.node_id}" + (f"-{client_tag}" if client_tag else "")
        # The node's own connection is persistent and announces the node (birth, will,
        # fingerprints); a tagged one (a short-lived CLI command) does neither.
        self._announces = not client_tag
        self._started = False
        # (with broker.auto any node may come to host the bus: amqtt speaks 3.1.1 only)
        protocol = "3.1.1" if config.broker_auto else config.protocol
        self.transport = Transport(config.endpoints, client_id, protocol=protocol,
                                   persistent=not client_tag, tls=config.tls, credentials=self.admission.credentials())
        self.transport.on_message = self._on_message
        self.transport.on_ack = self._on_ack
        self.sync = Sync(self)
        self.trace = Trace(self)
        self.presence = Presence(self)
        self.relay = Relay(self)
        self.handover = Handover(self)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Node:
        """Connect to the broker, follow the configured regions, send what the outbox holds."""
        self.store.checkpoint_in_background()
        if self._worker is None or not self._worker.is_alive():  # (started again after a lost connection: one)
            self._worker = threading.Thread(target=self._work, daemon=True, name=f"edgeswarm-inbox-{self.node_id}")
            self._worker.start()
        self.transport.subscribe([*(region_filter(r) for r in self.config.regions), node_filter(self.node_id),
                                  *(node_filter(kind=k) for k in ("trace", "trace-head", "birth", "death", "fingerprint",
                                                                  "revoke"))])
        if self._announces:
            self.presence.prepare()
            # After a reconnect paho made by itself (or a first connection made late), say that we are here.
            self.transport.on_connected = lambda: self._connected() if self._started else None
            self.transport.on_disconnected = lambda: self.presence.prepare() if self._started else None
        try:
            self.transport.connect()
        except TransportError as e:
            if not (self.handover.enabled and self._announces):
                raise
            # broker.auto: the node starts anyway, and the hand-over finds or elects a broker
            log.warning("%s; looking for a broker among the swarm's nodes", e)
            self._started = True
            self.transport.connect_later()
        else:
            if self._announces:
                self._connected()
        self._started = True
        if self._announces:
            self.handover.start()
        # What the outbox held at start goes out a window at a time, as acks come back: a
        # node that was offline for long may hold far more than fits in memory at once.
        if self.store.unpublished(limit=1):
            self._draining = True
            threading.Thread(target=self._drain, args=(self.store.meta("seq"),), daemon=True,
                             name=f"edgeswarm-outbox-{self.node_id}").start()
        if self._announces:  # (a short-lived CLI command schedules nothing)
            self.sync.start(self.config.sync_interval, self.config.snapshot_interval)
        return self

    def _connected(self) -> None:
        """(Re)connected: announce this node, and compare digests at once when anti-entropy
        is on, since whatever happened while away is best found now."""
        self.presence.announce()
        if self.config.sync_interval > 0:
            self.sync.publish_digests(hello=True)

    def send_now(self, topic: str, kind: str, body: dict, region: str | None = None, retain: bool = False,
                 wait: float | None = None) -> None:
        """Sign and publish a message that is not kept in the outbox: sync, trace and
        presence messages, which the next round repeats if they are lost (`wait`: up to that
        many seconds for the broker to have it)."""
        raw = self.sign(kind, region, body).raw
        self.counters[f"bytes-out.{kind}"] += len(raw)
        self.transport.publish(topic, raw, retain=retain, wait=wait)

    def snapshot(self) -> Path:
        """Write a signed snapshot of the consensus state to <home>/recovery now."""
        from . import snapshot
        return snapshot.write(self, keep=self.config.snapshots_kept)

    def sync_now(self) -> None:
        """Publish this node's digests now instead of at the next scheduled round."""
        self.sync.publish_digests()

    def stop(self) -> None:
        self.sync.stop()
        self.relay.flush(force=True)  # (the votes held for others leave before the death)
        if self._announces:
            self.presence.leave()
        self._started = False
        with self._acks:
            self._acks.notify_all()  # a backlog sender waiting for acks stops
        self.transport.close()
        self.handover.stop()
        if self._worker is not None:  # what was received is handled before the store closes
            self._inbox.put(None)
            self._worker.join(30)
            self._worker = None
        self._clear_acked()
        try:
            self.trace.settle()
        except Exception:
            log.warning("could not write the trace's lingering events as the node stops", exc_info=True)
        self.store.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- membership ------------------------------------------------------------------

    def members(self, region: str) -> set[str]:
        """The nodes whose writes and votes count in a region: the configured list, or the
        admitted nodes whose certificates cover it (a swarm with a roster), or (open swarm)
        this node and every node seen voting in the region."""
        if self._static_members is not None:
            return set(self._static_members)
        if self.admission.on:
            return self.admission.members(region)
        return {self.node_id, *self.store.voters(region)}

    def quorum(self, region: str) -> int:
        return self.config.quorum or len(self.members(region)) // 2 + 1

    def _counts(self, flagged: frozenset[str]) -> Callable[[str], bool]:
        members = self._static_members
        return lambda n: n not in flagged and (members is None or n in members)

    def add_validator(self, fn: Validator, region: str | None = None) -> None:
        """Register `fn(region, key, value) -> None | reason` as a coherence check."""
        self.coherence.add(fn, region)

    # -- reading ---------------------------------------------------------------------

    def get(self, region: str, key: str, *, consensus: bool = False) -> dict | None:
        """The value of a frame at this node's head (or at consensus); None when it does not
        exist or was deleted."""
        fv = self.consensus(region, key) if consensus else self.head(region, key)
        return None if fv is None else fv.value

    def head(self, region: str, key: str) -> FrameVersion | None:
        frame = self.store.frame(region, key)
        return None if frame.head is None else self.store.version(frame.head)

    def consensus(self, region: str, key: str) -> FrameVersion | None:
        frame = self.store.frame(region, key)
        return None if frame.consensus is None else self.store.version(frame.consensus)

    def history(self, region: str, key: str) -> list[FrameVersion]:
        return self.store.history(region, key)

    def forks(self, region: str, key: str) -> list[FrameVersion]:
        """The branch tips that conflict with the head (kept, never deleted)."""
        return [self.store.version(v) for v in self._decide(region, key, readonly=True).forks]

    def status(self, region: str, key: str) -> dict:
        """Head, consensus, quorum, vote tally and forks of a frame."""
        d = self._decide(region, key, readonly=True)
        votes = self.store.latest_votes(region, key)
        return {
            "region": region, "key": key,
            "head": d.head.hex() if d.head else None,
            "consensus": d.consensus.hex() if d.consensus else None,
            "state": d.states.get(d.head) if d.head else None,
            "quorum": self.quorum(region), "members": sorted(self.members(region)),
            "support": {v.hex(): n for v, n in sorted(d.support.items(), key=lambda i: -i[1])},
            "votes": {voter_id: v.hex() for voter_id, v in sorted(votes.items())},
            "forks": [v.hex() for v in d.forks],
            "flagged": sorted(self.store.flagged()),
        }

    def regions(self) -> list[str]:
        return self.store.regions()

    def swarm(self) -> dict[str, dict]:
        """What this node knows of every node: alive or not, session, regions, last fingerprint."""
        peers = self.store.peers()
        peers[self.node_id] = {"session": self.presence.session or self.store.meta("session"), "alive": 1,
                               "regions": list(self.config.regions),
                               "fingerprint": self.presence.fingerprint(), "self": True}
        return peers

    def keys(self, region: str) -> list[str]:
        return self.store.keys(region)

    def metrics(self) -> dict:
        """Swarm metrics as this node sees them (see node/metrics.py)."""
        from .metrics import compute
        return compute(self)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    # -- writing ---------------------------------------------------------------------

    def put(self, region: str, key: str, value: Mapping) -> str:
        """Replace the whole value of a frame; returns the new version (hex)."""
        value, encoded = diff.normalize_encoded(value)
        if type(value) is not dict:
            raise ValueError(f"a frame value is a map, not {type(value).__name__}")
        return self._change(region, key, lambda old: value, encoded)

    def patch(self, region: str, key: str, set: Mapping[KeyPath, Any] | None = None,
              delete: Iterable[KeyPath] = ()) -> str:
        """Set and delete keys (nested paths as tuples) in a frame; returns the new version (hex)."""
        ops = [["del", _path(p)] for p in delete]
        ops += [["set", _path(p), diff.normalize(v)] for p, v in (set or {}).items()]
        if not ops:
            raise ValueError("patch needs at least one key to set or delete")
        return self._change(region, key, lambda old: diff.apply(old, ops))

    def delete(self, region: str, key: str) -> str:
        """Delete a frame (a new version whose value is null; history is kept)."""
        def tombstone(old: dict | None) -> None:
            if old is None:
                raise KeyError(f"no frame {key!r} in region {region!r}")
            return None
        return self._change(region, key, tombstone)

    def _change(self, region: str, key: str, compute: Callable[[dict | None], dict | None],
                encoded: bytes | None = None) -> str:
        """A new version of a frame: `compute` gives its value from the head's (`encoded`: the
        canonical CBOR of what it gives, when the caller has it)."""
        validate_region(region)
        validate_key(key)
        self.admission.check_own(region)
        with self._transaction():
            frame = self.store.frame(region, key)
            head = frame.head
            old, gen, merged = (None, 0, ()) if head is None else self.store.version_info(head)[2:]
            new = compute(old)
            ops = diff.make(old, new)
            if not ops:
                if head is None:
                    raise KeyError(f"no frame {key!r} in region {region!r}")
                return head.hex()
            reason = self.coherence.check(region, key, new)
            if reason:
                raise CoherenceError(f"{region}/{key}: {reason}")
            encoded = canonical(new) if encoded is None else encoded
            version = diff.version_hash_of(region, key, head, encoded)
            body = {"key": key, "parent": head, "version": version, "ops": ops}
            if len(merged) > 1:
                body["merge"] = list(merged)  # so receivers can rebuild the merge
            hlc = self._stamp()
            self.store.add_version(region, key, version, (head,) if head else (), new, self.node_id, hlc, gen + 1,
                                   encoded=encoded)
            # (what a batch writes next to this frame builds on this)
            self.store.set_frame(region, key, Frame(version, frame.consensus, frame.round, frame.settled))
            change = _Change(region, key, body, head, version, hlc)
            if self._batched is None:
                self._sign_change(change, vote=True)
                self._after_writes(region, key, frame)
            else:  # (signed as the batch ends)
                self._changes.append(change)
                self._batched.setdefault((region, key), frame)
        return version.hex()

    def _sign_change(self, change: _Change, vote: bool) -> None:
        """Sign, store and queue this node's diff for a change; with `vote`, the diff is this
        node's vote for its version too (node.votes_in_diffs), in the frame's next round."""
        region, key, body, parent, version, hlc = change
        round_ = None
        if vote:
            frame = self.store.frame(region, key)
            round_ = self._own_round(region, key, frame)
            if round_ is not None:
                body = {**body, "round": round_}
                self.store.set_frame(region, key, replace(frame, round=round_))
        env = self._send("diff", region, body, hlc=hlc)
        # A change too big to send: its diff signed (with its vote's round, sealed where its
        # region is) must leave room for what a pull wraps it in. (Refused here, in the
        # transaction, which this undoes: in a batch, as the batch ends.)
        if (size := signed_length(env)) > (limit := self.config.max_message_bytes - PULL_ROOM):
            raise ValueError(f"this change is {size} bytes once signed; the limit is {limit} "
                             f"(node.max_message_bytes, less {PULL_ROOM} for what a pull wraps it in)")
        self._own_diffs[env.msg_id] = (self.node_id, env.seq, region, key, version, parent)
        self.trace.record("wrote", region=region, key=key, version=version)
        if round_ is not None:
            self._voted(region, key, round_, version, env.msg_id)  # (the diff, stored as it is signed, is the vote)
        self.counters["sent"] += 1

    # -- transactions, outbox and publishing -----------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A store transaction; what it queued is published and notified after COMMIT,
        and forgotten on ROLLBACK. A nested one joins the outer: only the outermost
        publishes, once everything is committed."""
        with self.store.transaction():  # (holds the store lock: the depth is this thread's)
            if self._tx_depth:
                self._tx_depth += 1
                try:
                    yield
                finally:
                    self._tx_depth -= 1
                return
            self._tx_depth = 1
            try:
                yield
                cleared = self._take_acked()
                self.trace.flush()
                self._seal()
            except BaseException:
                self._rolled_back()
                self._events.clear()
                self.trace.discard()
                self.relay.discard()
                raise
            finally:
                self._tx_depth = 0
            outs, self._outs = self._outs, []
            events, self._events = self._events, []
            relayed = self.relay.detach()
        if cleared:
            self._cleared(cleared)
        self._publish_all(self.relay.committed(relayed, outs))
        self.relay.flush(force=relayed.consensus)
        for fv in events:
            self._notify(fv)

    def sign(self, kind: str, region: str | None, body: Any, hlc: int | None = None) -> Envelope:
        """An envelope from this node with its next sequence number and its clock now (or
        `hlc`, a time the clock gave before, as stored)."""
        return signed(self.identity, self._prepare(kind, region, body, hlc))

    def _prepare(self, kind: str, region: str | None, body: Any, hlc: int | None = None) -> Envelope:
        """sign() but for the signature."""
        with self.store.transaction():
            seq = self.store.next_seq()
            if hlc is None:
                hlc = self._stamp()
        return prepare(self.identity, kind, region, seq, hlc, body)

    def _stamp(self) -> int:
        """The clock now, stored (a restarted node's clock goes on from it)."""
        hlc = self.clock.now()
        self.store.set_meta("hlc", hlc)
        return hlc

    def _send(self, kind: str, region: str, body: Any, topic: str | None = None, hlc: int | None = None) -> Envelope:
        """A message (sealed, in a sealed region) for the outbox, in the caller's transaction,
        for the region's topic of its kind unless `topic` says: signed, and stored in the
        outbox, as that transaction commits (_seal). Returned prepared: its `raw` is empty."""
        env = self._prepare(kind, region, self.seals.seal(region, body) if kind in SEALED_KINDS else body, hlc)
        self._sends.append((topic or region_topic(kind, region), env))
        return env

    def _seal(self) -> None:
        """(As a transaction commits, under the store lock.) Sign what it sends: with
        node.batch, the messages for one topic together under one signature (each kept in
        its item form), each alone otherwise and for a single vote of this node's for its
        own version (which its relay passes on: relay.committed); store them in the outbox,
        and the envelopes of this node's diffs and votes among them."""
        if not self._sends:
            return
        sends, self._sends = self._sends, []
        own = [env for _, env in sends if self.relay.is_own(env.msg_id)]
        alone = own[0] if len(own) == 1 else None
        by_topic: dict[str, list[Envelope]] = {}
        for topic, env in sends:
            by_topic.setdefault(topic, []).append(env)
        queued: list[Queued] = []
        for topic, envs in by_topic.items():
            if self.config.batch:
                # (the signature and arrays of a batch take ~80 bytes)
                chunks = [[e] for e in envs if e is alone] + list(fitting(
                    [e for e in envs if e is not alone], lambda e: len(e.payload), self.config.max_message_bytes, 80))
            else:
                chunks = [[e] for e in envs]
            for chunk in chunks:
                if len(chunk) == 1:
                    items = [signed(self.identity, chunk[0])]
                    raw = items[0].raw
                else:
                    raw, items = batch_items(self.identity, chunk)
                self._outs.append(Out(topic, items[0].kind, items[0].region, raw, tuple(e.seq for e in items),
                                      tuple(e.msg_id for e in items)))
                queued += [Queued(e.msg_id, topic, e.raw, e.seq) for e in items]
        self.store.queue(queued)
        votes = []
        for item in queued:
            if (row := self._own_diffs.pop(item.msg_id, None)) is not None:
                self.store.add_diff(item.msg_id, *row, item.envelope, "applied")
            elif (vote := self._own_votes.pop(item.msg_id, None)) is not None:
                region, key, round_ = vote
                votes.append((item.envelope, region, key, self.node_id, round_))
        self.store.set_vote_envelopes(votes)

    def _rolled_back(self) -> None:
        """What a transaction that rolled back was to send, and what it found, is forgotten."""
        self._sends.clear()
        self._outs.clear()
        self._own_diffs.clear()
        self._own_votes.clear()
        self._linear.clear()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Changes made inside are stored in one transaction (all of them, or none if the block
        raises) and, with node.batch, leave as one message per region under one signature
        (up to 1,024 changes in each, and no more than fits node.max_message_bytes), which is
        how a node keeps up with a sensor writing hundreds of frames a second. Each frame
        the batch changed is decided once, as it ends: its subscribers hear of its last
        version only, and this node's vote is in the diff of its last change
        (node.votes_in_diffs): one round per frame and batch, however often it changed. The
        changes are signed as it ends: one too big to send fails the batch then (ValueError)."""
        with self._transaction():
            if self._batched is not None:  # (a batch inside a batch joins it)
                yield
                return
            self._batched, self._changes = {}, []
            try:
                yield
                written, changes = self._batched, self._changes
            finally:
                self._batched, self._changes = None, []
            last = {(c.region, c.key): c for c in changes}
            for change in changes:  # (in the order made: a parent's diff before its child's)
                self._sign_change(change, vote=last[change.region, change.key] is change)
            for (region, key), was in written.items():
                self._after_writes(region, key, was)

    def _publish_all(self, outs: list[Out]) -> None:
        """What a committed transaction sends (sealed: _seal)."""
        for out in outs:
            if len(out.seqs) > 1:
                self.counters["batches-out"] += 1
            self.publish_tracked(out.topic, out.raw, out.kind, out.seqs)

    def _publish(self, item: Queued, kind: str) -> None:
        self.publish_tracked(item.topic, item.envelope, kind, (item.seq,))

    def track(self, ids: tuple[int, ...]) -> None:
        """Outbox messages on their way to the broker (wait_published waits for them)."""
        with self._acks:
            self._inflight.update(ids)

    def publish_tracked(self, topic: str, raw: bytes, kind: str, ids: tuple[int, ...]) -> None:
        """Publish a message carrying the outbox messages `ids` (their sequence numbers; perhaps
        none): they leave the outbox once the broker acknowledges it."""
        self.track(ids)
        self.counters[f"bytes-out.{kind}"] += len(raw)
        if self.transport.publish(topic, raw, token=ids or None) is None and ids:
            with self._acks:  # not started: they stay in the outbox until start()
                self._inflight.difference_update(ids)

    def _on_ack(self, token: tuple[int, ...]) -> None:
        """The broker has a message carrying outbox messages (their seqs: publish_tracked). Their
        outbox rows go in the next transaction, with what it writes (the outbox pages a new
        vote or write appends to are the ones they leave: written once), or at the latest
        ACK_CLEAR_AFTER later in one of their own (the worker is woken to time it); never in
        paho's callback. (A crash before then sends them again: receivers drop duplicates.)
        A member of a busy swarm thus commits once less per change than when each
        acknowledgement had its own transaction."""
        with self._acks:
            self._inflight.difference_update(token)
            wake = not self._acked
            if wake:
                self._ack_due = time.monotonic() + ACK_CLEAR_AFTER
            self._acked.extend(token)
            self._acks.notify_all()
        if wake:
            self.wake()

    def wake(self) -> None:
        """Have the inbox worker look up (acknowledgements to clear, votes due to leave); the
        worker itself looks up before it waits again."""
        if threading.current_thread() is self._worker:
            return
        try:
            self._inbox.put_nowait(_WAKE)
        except queue.Full:  # the worker is busy: it looks up after each batch anyway
            pass

    def _clear_acked(self, due: bool = False) -> None:
        """Delete the acknowledged outbox rows in a transaction of their own (with `due`, only
        once they have waited ACK_CLEAR_AFTER for another one)."""
        with self._acks:
            if not self._acked or due and time.monotonic() < self._ack_due:
                return
        try:
            with self._transaction():
                pass  # (the outermost transaction takes them: _take_acked)
        except Exception:  # left in the outbox: sent again at the next start, and dropped as known
            log.warning("could not clear acknowledged messages from the outbox", exc_info=True)
            with self._acks:  # (not tried again and again)
                self._acked.clear()
                self._acks.notify_all()

    def _take_acked(self) -> int:
        """(In the outermost transaction, before COMMIT.) Delete the acknowledged outbox rows;
        how many, for _cleared once committed. A DELETE that fails costs the transaction
        nothing else: only that statement is undone (unless the store gave up the whole
        transaction, which then fails as it would have anyway), and the rows stay in the
        outbox, sent again at the next start and dropped there as known."""
        with self._acks:
            acked = list(self._acked)
        if acked:
            try:
                self.store.mark_published(acked)
            except Exception:
                if not self.store.db.conn.in_transaction:
                    raise
                log.warning("could not clear %d acknowledged messages from the outbox", len(acked), exc_info=True)
        return len(acked)

    def _cleared(self, count: int) -> None:
        with self._acks:  # (only now: wait_published means the outbox table is clear too)
            del self._acked[:count]  # (those acknowledged since: due no later than these were)
            self._ack_due = min(self._ack_due, time.monotonic() + ACK_CLEAR_AFTER)
            self._acks.notify_all()

    def _drain(self, until_seq: int) -> None:
        """Send the outbox backlog (envelopes stored before start() and not acknowledged) a
        window at a time. Runs in its own thread: paho calls on_publish holding its own lock,
        so publishing from the acknowledgement callback could deadlock with a publisher."""
        after = 0
        try:
            while self._started:
                items = self.store.unpublished(limit=OUTBOX_WINDOW, after_seq=after, until_seq=until_seq)
                if not items:
                    return
                for item in items:
                    self._publish(item, parse_topic(item.topic).kind)
                after = items[-1].seq
                with self._acks:
                    self._acks.wait_for(lambda: len(self._inflight) < OUTBOX_WINDOW // 2 or not self._started, 30)
        except Exception:  # e.g. the store closed by stop(): what is left goes out at the next start
            log.debug("outbox backlog interrupted", exc_info=True)
        finally:
            with self._acks:
                self._draining = False
                self._acks.notify_all()

    def wait_published(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has acknowledged everything this node sent (and the outbox
        let it go)."""
        with self._acks:
            self._ack_due = 0.0  # (no waiting for a transaction to take them along)
        self.wake()
        with self._acks:
            return self._acks.wait_for(lambda: not self._inflight and not self._draining and not self._acked,
                                       timeout)

    # -- subscriptions ---------------------------------------------------------------

    def subscribe(self, callback: Callback, region: str | None = None) -> Callable[[], None]:
        """Call `callback(FrameVersion)` when a frame in `region` (and below, or anywhere when
        None) gets a new head (state "shadow") or a new consensus (state "consensus").
        Callbacks run in the thread that handles messages (the inbox worker, or the network
        thread for a lone diff): keep them short, and never wait in them for the swarm.
        Returns an unsubscribe function."""
        if region is not None:
            validate_region(region)
        entry = (region, callback)
        with self._sub_lock:
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._sub_lock:
                if entry in self._subscribers:
                    self._subscribers.remove(entry)
        return unsubscribe

    async def changes(self, region: str | None = None) -> AsyncIterator[FrameVersion]:
        """Async iterator over the same events as `subscribe`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[FrameVersion] = asyncio.Queue()
        unsubscribe = self.subscribe(lambda fv: loop.call_soon_threadsafe(queue.put_nowait, fv), region)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    def _notify(self, fv: FrameVersion) -> None:
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for region, callback in subscribers:
            if region is None or region_covers(region, fv.region):
                try:
                    callback(fv)
                except Exception:
                    log.exception("subscriber callback failed")

    # -- receiving -------------------------------------------------------------------

    def _reject(self, reason: str, detail: str) -> None:
        self.counters[f"rejected.{reason}"] += 1
        n = self.counters[f"rejected.{reason}"]
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: visible without flooding the log
            # QoS 1 delivers at least once: duplicates are normal, the rest is not.
            log.log(logging.DEBUG if reason == "duplicate" else logging.WARNING,
                    "rejected message (%s, %d so far): %s", reason, n, detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """A message from the broker, in the network thread. A lone diff up to INLINE_BYTES
        is handled right here when no earlier message waits and neither the worker nor any
        other thread is using the store (this thread should not wait for it: amqtt drops a
        delivery whose acknowledgement it waited 5 s for, say behind a snapshot). The vote
        it brings leaves with this thread's next write, with no hand-over to the worker and
        back, each a wait for the scheduler on a busy board (bench_consensus, 20 nodes on 2
        cores: a peer's vote reached its socket 0.2 ms after it was cast instead of 4.5 ms,
        p50, and each node spent ~15 % less CPU per write). Anything else goes to the inbox,
        in order (batches there keep their pipelining, and votes their one transaction for
        all that wait)."""
        if _later(topic):  # (set aside by the worker, out of the live order)
            self._inbox.put((topic, payload))
            return
        with self._queue_lock:
            inline = topic.startswith(_DIFFS) and len(payload) <= INLINE_BYTES and self._queued == 0 \
                and self._working.acquire(blocking=False)
            if inline and self.store.busy():
                self._working.release()
                inline = False
            if not inline:
                self._queued += 1
        if not inline:
            self._inbox.put((topic, payload))
            return
        try:
            self._handled([(topic, payload)])
        finally:
            self._working.release()

    def _work(self) -> None:
        """The inbox worker: handle what arrives a batch at a time, in order, except that the
        kinds in _LATER are set aside and handled one at a time, when no other message
        waits or else one after each batch (neither kind waits on the other for long; the
        inbox holds no more than INBOX_SIZE of them either)."""
        later: deque[tuple[str, bytes]] = deque()
        while True:
            if later and (self._inbox.empty() or len(later) >= INBOX_SIZE):  # (this thread alone takes)
                self._in_turn([later.popleft()])
                continue
            batch = [self._next()]
            while len(batch) < INBOX_BATCH and batch[-1] is not None:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            now = []
            for m in batch:
                if m is not None and m is not _WAKE:
                    (later if _later(m[0]) else now).append(m)
            self._in_turn(now, live=True)
            if stop:
                while later:  # (what came is handled before the store closes)
                    self._in_turn([later.popleft()])
                return
            if later:
                self._in_turn([later.popleft()])

    def _in_turn(self, messages: list[tuple[str, bytes]], live: bool = False) -> None:
        """Handle messages from the inbox (never while one is handled inline); `live`: they
        were counted in _queued."""
        try:
            with self._working:
                self._handled(messages)
        finally:
            if live and messages:
                with self._queue_lock:
                    self._queued -= len(messages)

    def _next(self) -> tuple[str, bytes] | None:
        """The next message of the inbox; meanwhile, the votes waiting to be passed on leave
        when they are due."""
        while (wait := self._wait()) is not None:
            try:
                return self._inbox.get(timeout=wait)
            except queue.Empty:
                with self._working:
                    self._due()
                with self._activity:
                    self._activity.notify_all()
        return self._inbox.get()

    def _due(self) -> None:
        """What the worker does of its own once it is due: votes to pass on, acknowledged
        outbox rows to clear, trace events to write (trace.py: Trace.flush)."""
        self.relay.flush()
        self._clear_acked(due=True)
        try:
            self.trace.settle(due=True)
        except Exception:  # (tried again with the next entry, or the next wait)
            log.warning("could not write the trace's lingering events", exc_info=True)

    def _wait(self) -> float | None:
        """Seconds until the worker has something to do of its own (None: nothing)."""
        wait = min((w for w in (self.relay.wait(), self.trace.wait()) if w is not None), default=None)
        with self._acks:
            if self._acked:
                due = max(0.0, self._ack_due - time.monotonic())
                wait = due if wait is None else min(wait, due)
        return wait

    def _handled(self, messages: list[tuple[str, bytes]]) -> None:
        self.receive_many(messages)
        self._due()
        self._handled_at = time.monotonic()
        with self._activity:
            self._activity.notify_all()

    def trouble(self, stalled_after: float = 60.0) -> str | None:
        """Why this running node needs a restart (its systemd watchdog stops on it), or None."""
        if self._worker is None or not self._worker.is_alive():
            return "the inbox worker is not running"
        if self._inbox.qsize() and time.monotonic() - self._handled_at > stalled_after:
            return f"the inbox worker has handled nothing for {stalled_after:.0f} s"
        return None

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until `condition()` holds, re-checking after each message this node handles."""
        with self._activity:
            return self._activity.wait_for(condition, timeout)

    def receive(self, topic: str, payload: bytes) -> None:
        """Handle one message as it came from the broker."""
        self.receive_many([(topic, payload)])

    def receive_many(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Handle messages as they came from the broker, in order; consecutive diffs and
        votes are taken in one transaction. A bug met on the way is counted and logged
        (rejected.internal), never raised: the receive loop goes on."""
        live: list[tuple[Envelope, str]] = []
        for topic, payload in messages:
            # votes sent to this node to pass on, or passed on by their version's author (relay.py)
            via = "inbox" if topic == self.relay.inbox else "relay" if is_relay(payload) else ""
            for env in self._decode(topic, payload, via):
                if env.kind in ("diff", "vote"):
                    live.append((env, via))
                    continue
                if live:
                    self._take(live)
                    live = []
                try:
                    self._dispatch(topic, env)
                except StoreFullError as e:
                    self._reject("disk-full", f"a {env.kind} not taken: {e}")
                except Exception:
                    self._internal_error(topic)
        if live:
            self._take(live)

    def _take(self, envs: list[tuple[Envelope, str]]) -> None:
        """Diffs and votes in one transaction. Votes sent to this node or relayed (`via`
        inbox or relay, see relay.py) skip the live replay window; those sent to it are
        passed on."""
        try:
            with self._transaction():
                self._addressed = {env.msg_id for env, via in envs if via == "inbox"}
                self._handle([env for env, via in envs if (self._admitted(env) if via else self._accept(env))])
        except StoreFullError as e:  # (each alone would not fit either; anti-entropy brings them later)
            self.counters["rejected.disk-full"] += len(envs) - 1
            self._reject("disk-full", f"{len(envs)} diffs and votes not taken: {e}")
        except Exception:
            if len(envs) == 1:
                self._internal_error(region_topic(envs[0][0].kind, envs[0][0].region))
                return
            for one in envs:  # the batch was rolled back: each on its own, so one bad one costs only itself
                self._take([one])
        finally:
            self._addressed = frozenset()

    def _internal_error(self, topic: str) -> None:
        self.counters["rejected.internal"] += 1
        log.exception("internal error while handling a message on %s", topic)

    def _decode(self, topic: str, payload: bytes, via: str = "") -> list[Envelope]:
        """The envelopes of a message (several when it is a batch or a relay), checked and
        opened. Votes `via` this node's vote inbox may be for any region; a relay carries
        votes only."""
        self.counters["received"] += 1
        if not payload and "/node/" in topic:
            self.counters["presence.cleared"] += 1  # a node clearing its retained birth or fingerprint
            return []
        me = self.identity.public_key
        try:
            if via == "relay":  # (it passes on this node's own votes among others: left unchecked)
                envs, own = decode_relay(payload, max_bytes=self.config.max_message_bytes, topic=topic, skip=me)
            else:
                envs, own = decode_many(payload, max_bytes=self.config.max_message_bytes,
                                        topic=None if via == "inbox" else topic), 0
        except EnvelopeError as e:
            self._reject(e.reason, f"{topic}: {e}")
            return []
        if via:
            if any(env.kind != "vote" or env.region is None for env in envs):
                self._reject("topic-mismatch", f"{topic}: a relay or a vote inbox takes votes only")
                return []
            own += sum(env.sender == me for env in envs)
            if own:
                self.counters["own.relayed"] += own
                envs = [env for env in envs if env.sender != me]
                if not envs:
                    return []
        elif envs[0].sender == me:
            self.counters["own"] += 1
            self.presence.on_own(envs[0])
            return []
        self.counters[f"bytes-in.{envs[0].kind}"] += len(payload)
        return [env for env in map(self.unseal, envs) if env is not None]

    def unseal(self, env: Envelope) -> Envelope | None:
        """A diff or vote of a sealed region with its body opened; None (counted) when it
        cannot be: sealed with another key, sealed where this node holds no key, or plain
        where the region is sealed."""
        if env.kind not in SEALED_KINDS or env.region is None:
            return env
        if self.seals.box(env.region) is None:
            if is_sealed(env.body):
                self.counters["ignored.sealed"] += 1
                return None
            return env
        if not is_sealed(env.body):
            self._reject("not-sealed", f"a plain {env.kind} from {env.sender_id} in sealed {env.region}")
            return None
        try:
            return replace(env, body=self.seals.open(env.region, env.body))
        except SealError as e:
            self._reject(e.reason, f"from {env.sender_id}: {e}")
            return None

    def _dispatch(self, topic: str, env: Envelope) -> None:
        """Handle a message other than a diff or vote."""
        if env.kind == "revoke":  # signed by the swarm admin, on the revoked node's topic
            try:
                with self._transaction():
                    self.admission.on_revoke(env, topic)
            except RosterError as e:
                self._reject("bad-revocation", f"{topic}: {e}")
            return
        if env.kind in ("birth", "death", "fingerprint"):
            # Retained, so delivered again on every subscription: no replay window; the
            # session and clock in them decide what is news. A node speaks only for itself.
            if parse_topic(topic).node_id != env.sender_id:
                self._reject("topic-mismatch", f"a {env.kind} from {env.sender_id} on {topic}")
                return
            if self._too_far_ahead(env):
                return
            try:
                # One transaction: whoever sees the certificate it brings (Node.members) finds
                # the peer record it updates too; a refused certificate undoes the record.
                with self._transaction():
                    self.presence.on_message(env)
            except RosterError as e:
                self._reject("bad-certificate", f"{env.kind} of {env.sender_id}: {e}")
            except (MalformedError, ValueError) as e:
                self._reject("bad-presence", f"{env.kind} from {env.sender_id}: {e}")
            return
        sync = {"digest": self.sync.on_digest,
                "sync-req": self.sync.on_request, "sync-resp": self.sync.on_response,
                "trace": self.trace.on_push, "trace-head": self.trace.on_head, "trace-req": self.trace.on_request,
                "trace-resp": self.trace.on_response}.get(env.kind)
        if sync is None:
            self.counters[f"ignored.{env.kind}"] += 1
            return
        with self._transaction():
            accepted = self._accept(env)
        if accepted:
            try:
                sync(env)
            except (MalformedError, ValueError) as e:
                self._reject("bad-sync", f"{env.kind} from {env.sender_id}: {e}")

    def handle_many(self, envs: list[Envelope]) -> None:
        """Apply verified diffs and votes a pull brought (they skip the live replay window;
        the clock and the roster still judge them) in one transaction, deciding each frame
        they touch once at the end (a sync response may bring hundreds for a few frames)."""
        with self._transaction():
            self._handle([env for env in envs if self._admitted(env)])

    def _handle(self, envs: list[Envelope]) -> None:
        self._deferred = {}
        try:
            for env in envs:
                {"diff": self._receive_diff, "vote": self._receive_vote}[env.kind](env)
            touched = self._deferred
        finally:
            self._deferred = None
        for region, key in touched:
            self._reconsider(region, key)

    def _touch(self, region: str, key: str) -> None:
        """A frame changed: decide it again now, or at the end of `handle_many`."""
        if self._deferred is not None:
            self._deferred[(region, key)] = None
        else:
            self._reconsider(region, key)

    def _too_far_ahead(self, env: Envelope) -> bool:
        """A clock beyond node.max_clock_skew would drag this node's clock, and every timestamp
        it issues, into the future: rejected. A node whose own wall clock is not set yet (a
        board without a real-time clock before NTP answers) cannot tell, and lets it pass."""
        skew = self.config.max_clock_skew
        now = time.time() * 1000
        if not skew or now < PLAUSIBLE_WALL_MS or (ahead := wall_ms(env.hlc) - now) <= skew * 1000:
            return False
        self._reject("clock-skew", f"{env.kind} from {env.sender_id}: its clock is {ahead / 1000:,.0f} s ahead "
                                   f"of this node's (node.max_clock_skew is {skew:g} s)")
        return True

    def _refused(self, env: Envelope) -> bool:
        """A sender the roster does not admit (for this region): rejected and counted."""
        reason = self.admission.refuse(env)
        if reason is not None:
            self._reject(reason, f"a {env.kind} from {env.sender_id}" + (f" in {env.region}" if env.region else ""))
        return reason is not None

    def _admitted(self, env: Envelope) -> bool:
        """A clock not too far ahead and an admitted sender (a pulled or relayed message,
        which skips the replay window)."""
        return not self._too_far_ahead(env) and not self._refused(env)

    def _accept(self, env: Envelope) -> bool:
        """Replay window: each (sender, seq) is taken once; a clock not too far ahead; an
        admitted sender. A sender's kinds in _LATER have a window of their own: the inbox
        sets them aside while live traffic goes first, and they would fall behind the live
        window (a trace push held back while its sender's votes went on looked like a replay
        of an old message, and was fetched again)."""
        if self._too_far_ahead(env) or self._refused(env):
            return False
        sender = env.sender_id
        # (no node id holds '/'; a batch holds one topic's messages, whose seqs skip those
        # of the sender's messages in other topics meanwhile)
        window = f"{sender}/{_ROUND_WINDOW}" if env.kind in _LATER else f"{sender}/{env.kind}/{env.region}"
        top, mask = self.store.sender_window(window)
        if not top:  # a window kept per sender alone (before 0.2): the topic's starts from it
            top, mask = self.store.sender_window(sender)
        try:
            top, mask = accept_seq(top, mask, env.seq)
        except EnvelopeError as e:
            self._reject(e.reason, f"from {sender}: {e}")
            return False
        self.store.set_sender_window(window, env.sender, top, mask, env.hlc)
        self.clock.observe(env.hlc)
        return True

    def _receive_diff(self, env: Envelope) -> None:
        sender = env.sender_id
        try:
            key, parent, version, ops, merge, round_ = parse_diff(env.body)
        except (MalformedError, ValueError) as e:
            self._reject("bad-diff", f"from {sender}: {e}")
            return
        if round_ is not None:  # its author's vote for it, taken whatever becomes of the diff
            self._take_vote(env, key, version, round_, None)
        if self.store.has_version(version):
            self.store.add_diff(env.msg_id, sender, env.seq, env.region, key, version, parent, env.raw, "applied")
            self.counters["known"] += 1
            return
        if not self._parent_ready(env.region, key, parent, merge):
            self.store.add_diff(env.msg_id, sender, env.seq, env.region, key, version, parent, env.raw, "pending")
            self.counters["pending"] += 1
            return
        ok = self._apply(env, key, parent, version, ops)
        self.store.add_diff(env.msg_id, sender, env.seq, env.region, key, version, parent, env.raw,
                            "applied" if ok else "rejected")
        if ok:
            self._touch(env.region, key)

    def _apply(self, env: Envelope, key: str, parent: bytes | None, version: bytes, ops: list) -> bool:
        """Apply a diff (its `ops` as parse_diff gives them: checked) to its stored parent;
        store the result if the hash matches."""
        sender = env.sender_id
        old, gen = None, 1
        if parent is not None:
            info = self.store.version_info(parent)
            if info is None or info[:2] != (env.region, key):
                self._refuse(env, key, version, "bad-diff", "parent belongs to another frame")
                return False
            old, gen = info.value, info.gen + 1
        try:
            new = diff.apply(old, ops, checked=True)  # (parse_diff checked them)
        except diff.DiffError as e:
            self._refuse(env, key, version, "bad-diff", str(e))
            return False
        encoded = canonical(new)
        if diff.version_hash_of(env.region, key, parent, encoded) != version:
            self._refuse(env, key, version, "wrong-hash", "parent + diff does not give the claimed version")
            return False
        reason = self.coherence.check(env.region, key, new)
        if reason:
            self.counters["incoherent"] += 1
            log.warning("version %s of %s/%s from %s fails coherence: %s", version.hex()[:16], env.region, key,
                        sender, reason)
        self.store.add_version(env.region, key, version, (parent,) if parent else (), new, sender, env.hlc, gen,
                               coherent=not reason, reason=reason, encoded=encoded)
        self.counters["applied"] += 1
        self.trace.record("rejected" if reason else "accepted", region=env.region, key=key, version=version,
                          author=sender, **({"reason": reason} if reason else {}))
        log.info("stored %s/%s version %s from %s", env.region, key, version.hex(), sender)
        return True

    def _receive_vote(self, env: Envelope) -> None:
        try:
            key, version, round_, merge = parse_vote(env.body)
        except (MalformedError, ValueError) as e:
            self._reject("bad-vote", f"from {env.sender_id}: {e}")
            return
        self._take_vote(env, key, version, round_, merge)

    def _take_vote(self, env: Envelope, key: str, version: bytes, round_: int, merge: list[bytes] | None) -> None:
        """A vote, or the vote a diff carries (its envelope is then the diff's)."""
        voter_id = env.sender_id
        if voter_id in self.store.flagged():
            self.counters["ignored.flagged-vote"] += 1
            return
        previous = self.store.add_vote(env.region, key, voter_id, round_, version,
                                       env.raw if env.kind == "vote" else env.msg_id,  # (a diff: stored with it)
                                       merge and tuple(merge))
        if previous is not None:
            if previous[0] != version:  # (the held one may be superseded: its envelope is gone)
                self._flag(voter_id, f"two votes in round {round_} of {env.region}/{key}", previous[1] or b"",
                           env.raw)
            self.counters["votes.known"] += 1
            return
        self.counters["votes"] += 1
        frame = self.store.frame(env.region, key)
        if env.msg_id in self._addressed and voter_id in self.members(env.region):
            self.relay.take(env, late=version == frame.consensus)
        if version == frame.head == frame.consensus:
            return  # one more vote for what is already head and consensus changes neither
        self._touch(env.region, key)

    def _refuse(self, env: Envelope, key: str, version: bytes, reason: str, detail: str) -> None:
        """A validly signed diff that does not hold: count it and keep it in the trace."""
        self._reject(reason, f"from {env.sender_id}: {detail}")
        self.trace.record("rejected", region=env.region, key=key, version=version, author=env.sender_id,
                          reason=f"{reason}: {detail}")

    def _flag(self, node_id: str, reason: str, evidence_a: bytes, evidence_b: bytes) -> None:
        """A node caught saying two things (votes, trace entries): keep both signed pieces as
        proof, ignore it from now on."""
        self.counters["equivocations"] += 1
        log.warning("node %s equivocates (%s); its votes and writes no longer count", node_id, reason)
        self.exclude(node_id, reason, evidence_a, evidence_b)

    def exclude(self, node_id: str, reason: str, evidence_a: bytes, evidence_b: bytes = b"") -> None:
        """From now on the node's votes and writes do not count (kept: the evidence why)."""
        self.store.flag(node_id, reason, evidence_a, evidence_b)
        self._linear.clear()
        self.trace.record("flagged", node=node_id, reason=reason)
        for region, key in self.store.voted_frames(node_id):
            self._reconsider(region, key)
