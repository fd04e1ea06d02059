"""The trace: each node's append-only, hash-chained, signed log of what it did and decided.

An entry is the canonical CBOR of [seq, prev, hlc, event, data]: seq counts from 1, prev is
the hash of entry seq-1 (null for the first), the hash of an entry is BLAKE2b-256 of those
bytes, and the node signs them. What a node does in one transaction (a write and the vote
it casts on it; a batch of received diffs, the votes on them and the consensus they reach)
goes in one entry: the event `events`, whose data lists each as [event, hlc, data], up to
EVENTS_PER_ENTRY of them (one signature, one row and one copy on each peer instead of one
per event); an entry of one event is written as that event.

With each anti-entropy round a node pushes the entries it recorded since the last round
to every peer at once (`trace`, on its node topic), then publishes its head (seq, hash;
`trace-head`); a peer that still holds less (it was away, or came late) asks for the
missing range (`trace-req`) and gets it alone (`trace-resp`, on its own node topic).
Entries travel as [entry, signature] pairs (`entries`), or packed (`packed`, shared/packing.py:
the pairs' bytes in one deflated list, half the bytes: at 20 nodes the copies of traces are
most of what the bus delivers) to nodes that read packs — a response when its trace-req says
so (`packed`), a push when every live peer's birth or fingerprint does (`packs`; a node of an
older release counts a packed push as malformed and asks for the entries, as for any gap).
Either way the entries come in the node's own signed envelope, and the receiver checks
them as one chain: contiguous seqs, each prev matching, and the signature of the last
entry, which covers every earlier one through the chain. Two
different signed entries at one seq, or a head that contradicts a held entry, prove that
the node rewrote its history: it is flagged with both as evidence.

A node keeps the last `trace_kept` entries of each trace (its own and its copies) and drops
older ones at each anti-entropy round. Asked for a range it no longer holds, it answers
from its oldest entry and says how far it pruned (`pruned`); the asker then takes that
entry as the new start of its copy (counted as `trace.anchored`): the entries in between
cannot be checked any more, anything from there on is. A response that leaves the asker
short of the head it was announced is followed at once by the next request. A node whose
store may have lost its last entries (restored, or opened after a power cut: restart.py)
goes on from a new start far above them, with no link back; asked for what lies between,
it answers as a pruned trace does, so a peer keeps the entries the node lost and anchors
its copy at the new start.

Events: wrote, accepted, rejected, voted, merged, consensus, flagged (and `events`, which holds some).
A vote the node casts in the transaction that wrote or accepted its version rides in that
event, as its `round` (one event instead of two: a write, or a diff taken and voted for).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeswarm.shared import packing
from edgeswarm.shared.envelope import MalformedError, canonical, strict_loads
from edgeswarm.shared.identity import verify
from edgeswarm.shared.topics import node_topic

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("edgeswarm.trace")

MAX_RANGE = 500  # entries per trace-resp
PUSH_RANGE = 100  # entries per push: the receiver handles one push at a time between live messages
MAX_AUTHORS = 4096  # trace heads remembered (what each peer announced, to fetch up to it)
MAX_SEQ = 2**63 - 1  # (the store's integers)
EVENTS_PER_ENTRY = 64  # events of one transaction written in one entry at most
# Events that wait for the node's next entry (see Trace.flush): what it did with others'
# versions, each provable again from the signed diffs and votes it holds
LINGERING = frozenset({"accepted", "voted", "merged", "consensus"})
LINGER = 1.0  # seconds they wait at most
CARRY_VOTES = frozenset({"wrote", "accepted"})  # events that carry a vote on their version (see record)


@dataclass(frozen=True)
class TraceEntry:
    node_id: str
    seq: int
    prev: bytes | None
    hlc: int
    event: str
    data: Any
    hash: bytes

    @property
    def events(self) -> list[tuple[str, int, Any]]:
        """(event, hlc, data) of what the entry records: its event, or those it holds."""
        if self.event != "events":
            return [(self.event, self.hlc, self.data)]
        data = self.data if type(self.data) is list else []
        return [tuple(e) for e in data if type(e) is list and len(e) == 3 and type(e[0]) is str and type(e[1]) is int]

    def to_json(self) -> list[dict]:
        """One line per event, with the entry it is in."""
        return [{"node": self.node_id, "seq": self.seq, "hash": self.hash.hex(),
                 "prev": self.prev.hex() if self.prev else None, "hlc": hlc, "event": event, "data": data}
                for event, hlc, data in self.events]


def entry_hash(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=32).digest()


def parse(node_id: str, raw: bytes) -> TraceEntry:
    try:
        seq, prev, hlc, event, data = strict_loads(raw)
    except (TypeError, ValueError) as e:
        raise MalformedError(f"not a trace entry: {e}") from None
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ \
            or (prev is not None and (type(prev) is not bytes or len(prev) != 32)) \
            or type(hlc) is not int or type(event) is not str:
        raise MalformedError("a trace entry is [seq, prev, hlc, event, data]")
    return TraceEntry(node_id, seq, prev, hlc, event, data, entry_hash(raw))


class Trace:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = node.store
        self._announced: dict[str, int] = {}  # the highest head each author announced
        head = self.store.trace_head(node.node_id)
        self._pushed = head[0] if head else 0  # own entries up to here went out (or were there at start)
        # Where own entries start anew (restart.py; set before the node is made, never after)
        self._start = self.store.meta("trace_start")
        self._pending: list[list] = []  # events of the node's open transaction, [event, hlc, data]
        self._carriers: dict[bytes, dict] = {}  # version -> data of its CARRY_VOTES event in _pending
        # Decisions recorded by committed transactions and not yet in an entry (see flush),
        # since when the oldest waits; and, for the transaction open now, how many of them
        # its entry holds and the decisions it adds (both settled as it ends: _ended).
        self._lingering: list[list] = []
        self._since: float | None = None
        self._written = 0
        self._tentative: list[list] = []
        self._force = False
        self.store.end_listeners.append(self._ended)

    # -- own entries -----------------------------------------------------------------

    def record(self, event: str, **data: Any) -> None:
        """Record an event in this node's trace: in the entry the node's open transaction
        writes as it commits (see flush), else in an entry of its own now."""
        node = self.node
        with self.store.transaction():  # (holds the store lock: an open node transaction is this thread's)
            if node._tx_depth:
                if event == "voted" and (carrier := self._carriers.get(data["version"])) is not None \
                        and "round" not in carrier:
                    carrier["round"] = data["round"]
                    return
                if event in CARRY_VOTES:
                    self._carriers[data["version"]] = data
                self._pending.append([event, node.clock.now(), data])
            else:
                self._write([[event, node.clock.now(), data]])

    def flush(self) -> None:
        """Write the events of the node's transaction, as it commits. A transaction that only
        dealt with others' versions (LINGERING: a diff taken, a vote, a merge, a consensus,
        which the signed diffs and votes it holds prove again) writes no entry of its own:
        its events wait, at most LINGER seconds (and EVENTS_PER_ENTRY events), for the
        node's next entry. A member of a busy swarm so writes about one entry a second
        instead of one per change taken and one per decision: one signature, one row and
        one copy on every peer for all of them, and none of it between a diff's arrival and
        the vote it casts. A push, the node's stop and reading its own trace write them at
        once; a node that crashes or loses power loses at most those (its store, at most
        its last second of commits: store.py)."""
        pending, self._pending = self._pending, []
        self._carriers = {}
        force, self._force = self._force, False
        if not force and all(event in LINGERING for event, _, _ in pending) and not self._due() \
                and len(self._lingering) + len(self._tentative) + len(pending) <= EVENTS_PER_ENTRY:
            self._tentative += pending
            return
        self._write(pending)

    def _write(self, events: list[list]) -> None:
        """(In a store transaction.) Entries for these events, after the lingering ones not yet
        written in this transaction."""
        events = self._lingering[self._written:] + events
        self._written = len(self._lingering)
        for i in range(0, len(events), EVENTS_PER_ENTRY):
            self._append(events[i:i + EVENTS_PER_ENTRY])

    def _ended(self, committed: bool) -> None:
        """(The store, as a transaction ends, under its lock.) Once committed, the lingering
        events written are gone and the decisions it reached linger; rolled back, neither."""
        if committed:
            del self._lingering[:self._written]
            if self._tentative:
                self._lingering += self._tentative
                self._since = self._since if self._written == 0 and self._since is not None else time.monotonic()
            if not self._lingering:
                self._since = None
        self._written, self._tentative = 0, []

    def _due(self) -> bool:
        return self._since is not None and time.monotonic() - self._since >= LINGER

    def wait(self) -> float | None:
        """Seconds until lingering events are due to be written (None: none linger)."""
        since = self._since
        return None if since is None else max(0.0, since + LINGER - time.monotonic())

    def settle(self, due: bool = False) -> None:
        """Write the lingering events now (with `due`, only once they have waited LINGER)."""
        if self._since is None or due and not self._due():
            return
        try:
            with self.node._transaction():
                self._force = True
        except BaseException:  # (they wait for the next entry, or another LINGER)
            self._since = time.monotonic() if self._lingering else None
            raise

    def discard(self) -> None:
        """The node's transaction rolled back: what it did did not happen."""
        self._pending = []
        self._carriers = {}
        self._force = False

    def _append(self, events: list[list]) -> None:
        node = self.node
        with self.store.transaction():
            head = self.store.trace_head(node.node_id)
            # (a restored or rebooted node starts anew above its old entries, which its peers
            # may hold: restart.py)
            seq, prev = (head[0] + 1, head[1]) if head and head[0] > self._start else (self._start + 1, None)
            (event, hlc, data), = events if len(events) == 1 else [["events", events[-1][1], events]]
            raw = canonical([seq, prev, hlc, event, data])
            self.store.add_trace(node.node_id, seq, entry_hash(raw), prev, raw, node.identity.sign(raw))

    def entries(self, node_id: str, since: int = 0) -> list[TraceEntry]:
        if node_id == self.node.node_id:
            self.settle()
        return [parse(node_id, raw) for raw, _ in self.store.trace_range(node_id, since + 1, None)]

    # -- exchange --------------------------------------------------------------------

    def prune(self) -> int:
        """Drop what is beyond node.trace_kept of every trace held; how many entries went."""
        kept, dropped = self.node.config.trace_kept, 0
        if kept:
            for node_id in self.store.traced_nodes():
                dropped += self.store.prune_trace(node_id, kept)
        self.node.counters["trace.pruned"] += dropped
        return dropped

    def push(self) -> None:
        """Send every peer, in one go, the entries recorded since the last push."""
        self.settle()
        node = self.node
        head = self.store.trace_head(node.node_id)
        start = max(self._pushed + 1, self.store.trace_base(node.node_id) or 1)
        if head is not None and start <= self._start < head[0]:
            start = self._start + 1  # (started anew: nothing in between)
        while head is not None and start <= head[0]:
            entries = self._entries(start, min(head[0], start + PUSH_RANGE - 1))
            if not entries:
                break
            node.send_now(node_topic(node.node_id, "trace"), "trace",
                          self._carrying(entries, not node.presence.without("packs")))
            start = parse(node.node_id, entries[-1][0]).seq + 1
        self._pushed = max(self._pushed, head[0] if head else 0)

    def _entries(self, start: int, end: int) -> list[list[bytes]]:
        """[entry, signature] of own entries from `start` on, at most up to `end`, as many as
        fit in one message (at least one)."""
        entries, size = [], 0
        for raw, sig in self.store.trace_range(self.node.node_id, start, min(end, start + MAX_RANGE - 1, MAX_SEQ)):
            size += len(raw) + len(sig) + 8
            if entries and size > self.node.config.max_message_bytes // 2:
                break  # the rest in the next message
            entries.append([raw, sig])
        return entries

    @staticmethod
    def _carrying(entries: list[list[bytes]], packs: bool) -> dict:
        """The entries of a push or response, packed for readers of packs (when that is smaller)."""
        if packs and (packed := packing.smaller([b for pair in entries for b in pair])) is not None:
            return {"packed": packed}
        return {"entries": entries}

    def publish_head(self) -> None:
        node = self.node
        head = self.store.trace_head(node.node_id)
        if head is not None:
            node.send_now(node_topic(node.node_id, "trace-head"), "trace-head", {"seq": head[0], "hash": head[1]})

    def on_head(self, env: Any) -> None:
        author = env.sender_id
        body = env.body if type(env.body) is dict else {}
        seq, hash_ = body.get("seq"), body.get("hash")
        if type(seq) is not int or not 1 <= seq <= MAX_SEQ or type(hash_) is not bytes:
            raise MalformedError("a trace head is {seq, hash}")
        held = self.store.trace_entry(author, seq)
        if held is not None and held[0] != hash_:
            self._flag(author, f"trace head {seq} contradicts the entry held", held[1], env.raw)
            return
        self._announce(author, seq)
        self._request(author)

    def _announce(self, author: str, seq: int) -> None:
        if seq > self._announced.get(author, 0):
            if author not in self._announced and len(self._announced) >= MAX_AUTHORS:
                self._announced.pop(next(iter(self._announced)))
            self._announced[author] = seq

    def _request(self, author: str) -> None:
        """Ask `author` for the next entries up to the head it announced, if any are missing."""
        wanted = self._announced.get(author, 0)
        mine = self.store.trace_head(author)
        if mine is None or mine[0] < wanted:
            start = 1 if mine is None else mine[0] + 1
            self.node.send_now(node_topic(author, "trace-req"), "trace-req",
                               {"from": start, "to": min(wanted, start + MAX_RANGE - 1), "packed": True})
            self.node.counters["trace.requests-sent"] += 1

    def on_request(self, env: Any) -> None:
        body = env.body
        start, end = (body.get("from"), body.get("to")) if type(body) is dict else (None, None)
        if type(start) is not int or type(end) is not int or not 1 <= start <= min(end, MAX_SEQ):
            raise MalformedError("a trace request is {from, to}")
        packs = body.get("packed") is True
        body = {}
        me = self.node.node_id
        base = self.store.trace_base(me)
        if base is not None and start < base:  # pruned: what is left, from the oldest entry kept
            start, end, body["pruned"] = base, max(end, base), base - 1
        # Started anew (restart.py): the old entries up to the last one held, then, as for a
        # pruned trace, from the new start; nothing was ever held in between.
        if start <= self._start:
            old_top = self.store.trace_top(me, self._start)
            if old_top is not None and start <= old_top:
                end = min(end, old_top)
            else:
                start, end, body["pruned"] = self._start + 1, max(end, self._start + 1), self._start
        entries = self._entries(start, end)  # (the asker asks again for what did not fit)
        if entries:
            self.node.send_now(node_topic(env.sender_id, "trace-resp"), "trace-resp",
                               self._carrying(entries, packs) | body)

    def on_push(self, env: Any) -> None:
        """Entries the sender recorded since its last push, sent to every peer."""
        self.on_response(env, pushed=True)

    def on_response(self, env: Any, pushed: bool = False) -> None:
        """Entries of the sender's own trace: check and append them in order. A push that
        does not follow on from the copy held (this node was away, or came late) is set
        aside, and the entries between fetched: they come with it.

        The response is the author's own signed envelope, so its entries are the author's
        word; what makes the copy a proof on its own is checked once per response, not per
        entry: the entries link to each other and to the copy held, and the last one's
        signature holds (it signs the hash of the one before, which holds the hash of the
        one before that, down to the copy held)."""
        author = env.sender_id
        body = env.body if type(env.body) is dict else {}
        entries = self._entries_in(body)
        pruned = body.get("pruned")
        if not (pruned is None or (type(pruned) is int and 1 <= pruned < MAX_SEQ and not pushed)):
            raise MalformedError("a trace response says how far the trace was pruned as a sequence number")
        parsed = [(parse(author, raw), raw, sig) for raw, sig in entries]
        with self.node._transaction():  # (flagging may cast votes: they go out after COMMIT)
            head = self.store.trace_head(author)
            expected_seq, expected_prev = (head[0] + 1, head[1]) if head else (1, None)
            new, anchored = [], False
            for entry, raw, sig in parsed:
                if entry.seq < expected_seq:  # (the head is the highest held: only those below it can be held)
                    held = self.store.trace_entry(author, entry.seq)
                    if held is not None:
                        if held[0] == entry.hash:
                            continue
                        if verify(env.sender, raw, sig):  # (the proof must stand without the envelope)
                            self._flag(author, f"two trace entries at seq {entry.seq}", held[1], raw)
                        else:
                            self.node._reject("trace-signature", f"trace entry {entry.seq} from {author} "
                                                                 "with a bad signature")
                        return
                if pruned is not None and not new and entry.seq == pruned + 1 > expected_seq:
                    anchored = True  # the author no longer has what lies between
                elif pushed and not new and entry.seq > expected_seq:
                    self._announce(author, parsed[-1][0].seq)
                    break
                elif entry.seq != expected_seq or entry.prev != expected_prev:
                    self.node._reject("trace-chain", f"trace entry {entry.seq} from {author} does not extend "
                                                     f"the chain held (next {expected_seq})")
                    break
                new.append((entry, raw, sig))
                expected_seq, expected_prev = entry.seq + 1, entry.hash
            if not new:
                if pushed:
                    self._request(author)
                return
            last, raw, sig = new[-1]
            if not verify(env.sender, raw, sig):
                self.node._reject("trace-signature", f"trace entry {last.seq} from {author} with a bad signature")
                return
            if anchored:
                self.node.counters["trace.anchored"] += 1
                log.info("trace of %s: entries %d-%d were pruned by it; continuing from %d", author,
                         head[0] + 1 if head else 1, pruned, new[0][0].seq)
            self.store.add_traces(author, [(entry.seq, entry.hash, entry.prev, raw, sig) for entry, raw, sig in new])
            self.node.counters["trace.entries-fetched"] += len(new)
        self._request(author)  # more to fetch up to the head it announced: at once, not next round

    def _entries_in(self, body: dict) -> list[tuple[bytes, bytes]]:
        """The (entry, signature) pairs a push or response carries, as pairs or packed."""
        if "packed" in body:
            flat = packing.unpack(body["packed"], self.node.config.max_message_bytes)
            if len(flat) % 2:
                raise MalformedError("packed trace entries come as entry, signature, entry, signature...")
            return list(zip(flat[::2], flat[1::2]))
        entries = body.get("entries")
        if type(entries) is not list or any(type(item) is not list or len(item) != 2 or type(item[0]) is not bytes
                                            or type(item[1]) is not bytes for item in entries):
            raise MalformedError("a trace response carries a list of [entry, signature] (or a pack of them)")
        return entries

    def _flag(self, node_id: str, reason: str, evidence_a: bytes, evidence_b: bytes) -> None:
        self.node.counters["trace.forks"] += 1
        log.warning("node %s rewrote its trace: %s", node_id, reason)
        self.node._flag(node_id, reason, evidence_a, evidence_b)



def verify_chain(entries: list[TraceEntry]) -> bool:
    """True when `entries` (one node's, seq 1 upwards) form one unbroken chain."""
    prev = None
    for i, e in enumerate(entries, start=1):
        if e.seq != i or e.prev != prev:
            return False
        prev = e.hash
    return True
