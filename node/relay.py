"""Votes through their version's author: the swarm's consensus traffic in O(N), not O(N²).

Every member votes for every new version, and with each vote on the region's vote topic
every node handles a message from every member for every change: at 20 nodes, 380
deliveries per change, most of what the swarm spends on it. Instead a node sends its vote
for a version to the version's author (es/v1/node/<author>/vote) when that author says it
passes votes on (`relay` in its birth and fingerprints) and is alive. The author stores each
such vote as any other and passes those new to it on to the region's vote topic in one
relay message (shared/envelope.py: each vote as it came, under its voter's signature; the
votes of a batch sent to it, when all of them go, as that batch again: one signature check
for each reader instead of one per vote, and no paths — unless a live peer's birth or
fingerprint does not say it reads a batch in a relay, `relay-batches`, as before 0.9): at
once when a frame reaches consensus here, else at most RELAY_HOLD after the first one
waiting (LATE_HOLD for votes on what is consensus already). A change then costs N
deliveries to its author and N for each relay (the quorum's, then usually one with the late
votes). The author's consensus comes as soon as before, every other node's one relay later.

The author's own vote for a single write leaves in the same relay (it is in the outbox like
any vote, and cleared when the broker has the relay; a node that loses power before passing
it on sends it alone at its next start): every other node then takes the whole quorum in
one message, and nothing on the way to it. The own votes of a batch of writes leave as
their one batch message, at once. A vote for a merge (it has no author), or for an author
that is gone or does not relay goes on the region topic as before. If an author vanishes before
passing votes on, they reach the others with the next anti-entropy round (the digests cover
the votes held). A vote that comes relayed or addressed to this node skips the live replay
window, as a pulled one does (the relay reorders a voter's messages; the store drops a vote
it holds, and a replayed one is not passed on again).

node.relay_votes = false (for a swarm with nodes older than 0.3, which cannot read a relay)
sends every vote on the region topic and announces no relaying.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, NamedTuple

from edgeswarm.shared.envelope import Envelope, encode_relay, fitting, rebatch
from edgeswarm.shared.topics import node_topic, region_topic

from .store import Out

if TYPE_CHECKING:
    from .node import Node

# Seconds a vote waits for others to leave with it, when no consensus calls it out: long
# enough that before consensus the author relays nothing (at 20 nodes a relay going out
# meanwhile kept every node busy with it while the quorum's votes were still coming:
# bench_consensus, the writer's p50 ~50 ms with 0.02, ~36 ms with 0.2), short next to an
# anti-entropy round, for votes that reach no consensus (a fork). A vote for what is
# already consensus here (a late one) waits LATE_HOLD: the others' consensus does not
# wait for it, but their digests do (a healed split: ~2 s sooner with 0.05 than 0.2).
RELAY_HOLD = 0.2
LATE_HOLD = 0.05
RELAY_FRAMING = 16  # bytes of a relay's map and array around the messages it passes on


class _Taken(NamedTuple):
    votes: list[tuple[str, bytes]]  # (region, vote) sent to this node, new here
    own: set[bytes]  # msg ids of own votes for own versions
    consensus: bool  # a frame reached consensus
    early: bool  # a vote for what is not consensus here (yet)


class Relay:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.enabled = node.config.relay_votes
        self.inbox = node_topic(node.node_id, "vote")  # where votes for this node's versions come
        self.authors: set[str] = set()  # alive peers that pass votes on
        self._taken: list[tuple[str, bytes]] = []  # (region, vote) to pass on, once the transaction commits
        self._own: set[bytes] = set()  # msg ids of this transaction's own votes for own versions
        self._waiting: dict[str, list[tuple[bytes, int | None]]] = {}  # region -> (vote, outbox seq of an own one)
        self._due: float | None = None
        self._now = False  # a frame reached consensus in this transaction: what waits leaves at once
        self._early = False  # this transaction took a vote for what is not consensus here (yet)
        self._lock = threading.Lock()

    # -- sending a vote ---------------------------------------------------------------

    def vote_topic(self, region: str, author: str) -> str:
        if self.enabled and author and author != self.node.node_id and author in self.authors:
            return node_topic(author, "vote")
        return region_topic("vote", region)

    def own_vote(self, msg_id: bytes) -> None:
        """This node votes for its own version (inside the transaction): see committed()."""
        if self.enabled:
            self._own.add(msg_id)

    def is_own(self, msg_id: bytes) -> bool:
        """Whether the transaction's message is this node's vote for its own version."""
        return msg_id in self._own

    def on_presence(self, node_id: str, relays: bool) -> None:
        """What a peer's birth, fingerprint (relays: whether it says so) or death (False) tells."""
        if relays and self.enabled:
            self.authors.add(node_id)
        else:
            self.authors.discard(node_id)

    # -- passing votes on ---------------------------------------------------------------

    def take(self, env: Envelope, late: bool) -> None:
        """A vote sent to this node, new here (inside the transaction storing it); `late`:
        for what is consensus here already."""
        self._taken.append((env.region, env.raw))
        self._early |= not late

    def reached(self) -> None:
        """A frame reached consensus in this transaction."""
        self._now = True

    def discard(self) -> None:
        """The transaction rolled back."""
        self.detach()

    def detach(self) -> _Taken:
        """What the transaction took, as it commits (still holding the store)."""
        taken = _Taken(self._taken, self._own, self._now, self._early)
        self._taken, self._own, self._now, self._early = [], set(), False, False
        return taken

    def committed(self, taken: _Taken, outs: list[Out]) -> list[Out]:
        """The transaction committed: what it took waits to leave (flush(), at once if the
        transaction reached a consensus), with its own vote when it cast one for its own
        version alone (signed alone: Node._seal). Returns the rest of `outs`, to publish first."""
        own = [o for o in outs if taken.own.intersection(o.ids)] if taken.own else []
        if len(own) != 1 or len(own[0].ids) != 1:  # (a batch of writes: their votes leave as one batch)
            own = []
        votes = [(region, raw, None) for region, raw in taken.votes]
        if own:
            out = own[0]
            self.node.track(out.seqs)
            votes.append((out.region, out.raw, out.seqs[0]))
            outs = [o for o in outs if o is not out]
        if votes:
            due = time.monotonic() + (RELAY_HOLD if taken.early or own else LATE_HOLD)
            with self._lock:
                for region, raw, seq in votes:
                    self._waiting.setdefault(region, []).append((raw, seq))
                wake = self._due is None or due < self._due
                if wake:
                    self._due = due
            if wake:
                self.node.wake()  # (the worker times the flush; it may be waiting for a message)
        return outs

    def wait(self) -> float | None:
        """Seconds until what waits is due to leave (None: nothing waits)."""
        return None if self._due is None else max(0.0, self._due - time.monotonic())

    def flush(self, force: bool = False) -> None:
        """Publish what waits, if it is due (or `force`)."""
        with self._lock:
            if self._due is None or not (force or time.monotonic() >= self._due):
                return
            waiting, self._waiting, self._due = self._waiting, {}, None
        for region, votes in waiting.items():
            self.node.counters["votes-relayed"] += sum(seq is None for _, seq in votes)
            limit = self.node.config.max_message_bytes
            if not self.node.presence.without("relay-batches"):  # (a batch sent here, all of it: the batch)
                votes = [(raw, None) for raw in rebatch([raw for raw, seq in votes if seq is None],
                                                        limit - RELAY_FRAMING)] \
                    + [vote for vote in votes if vote[1] is not None]
            for chunk in fitting(votes, lambda vote: len(vote[0]), limit, RELAY_FRAMING):
                self._publish(region, chunk)

    def _publish(self, region: str, votes: list[tuple[bytes, int | None]]) -> None:
        """One relay; the outbox rows of this node's own votes in it are cleared once the
        broker has it."""
        node = self.node
        own = tuple(seq for _, seq in votes if seq is not None)
        node.counters["relays-out"] += 1
        node.publish_tracked(region_topic("vote", region), encode_relay([raw for raw, _ in votes]), "relay", own)
