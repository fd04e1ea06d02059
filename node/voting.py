"""The node's side of consensus: what it stores and sends for the voter's decisions.

voter.py decides from a snapshot of a frame; this mixin of Node loads that snapshot (the
settled window or the whole history), builds and stores merges, rebuilds merges peers
built on or voted for, applies diffs that waited for them, casts this node's vote and
records head, consensus and version states, all inside the caller's transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgeswarm.shared import diff
from edgeswarm.shared.envelope import decode

from . import voter
from .bodies import MAX_ROUND, parse_diff
from .store import Frame, VersionMeta

log = logging.getLogger("edgeswarm.node")

COMPACT_PER_ROUND = 2048  # frames whose votes a scheduled round compacts at most
LINEAR_FRAMES = 4096  # frames whose single leaf is remembered (Voting._after_writes)


class Voting:
    """Mixed into Node."""

    def _catch_up(self, region: str, key: str) -> None:
        """Rebuild the merges peers voted for and apply the diffs that were waiting for a
        parent, until neither makes progress."""
        progress = self.store.waiting(region, key)
        while progress:
            progress = False
            for version, parents in self.store.voted_merges(region, key):
                progress |= self._materialize(region, key, list(parents), version)
            for msg_id, raw in self.store.pending(region, key):
                env = self.unseal(decode(raw, max_bytes=len(raw)))  # (stored as it came: checked, sealed or not)
                if env is None:  # (a key file changed since)
                    self.store.set_diff_status(msg_id, "rejected")
                    continue
                key_, parent, version, ops, merge, _ = parse_diff(env.body)  # (its vote was taken on arrival)
                held = self.store.has_version(version)
                if held or self._parent_ready(region, key, parent, merge):
                    ok = held or self._apply(env, key_, parent, version, ops)
                    self.store.set_diff_status(msg_id, "applied" if ok else "rejected")
                    self.counters["pending-applied" if ok else "pending-rejected"] += 1
                    progress = True

    def _parent_ready(self, region: str, key: str, parent: bytes | None, merge: list[bytes] | None) -> bool:
        """True when a diff's parent is here, rebuilding it first if it is a merge of versions
        that are."""
        if parent is None or self.store.has_version(parent):
            return True
        return bool(merge) and self._materialize(region, key, merge, parent)

    def _dag(self, region: str, key: str) -> voter.Dag:
        return voter.Dag(self.store.frame_meta(region, key))

    def _merge_value(self, dag: voter.Dag, region: str, key: str,
                     parents: tuple[bytes, ...]) -> tuple[bytes, dict] | None:
        """(hash, value) of the three-way merge of `parents`, or None when they conflict or
        the result fails coherence."""
        base = dag.lca(parents)
        try:
            value = diff.merge(None if base is None else self.store.version_info(base).value,
                               [self.store.version_info(p).value for p in sorted(parents)])
        except diff.MergeConflict:
            return None
        if self.coherence.check(region, key, value):
            return None
        return diff.merge_hash(region, key, list(parents), value), value

    def _store_merge(self, dag: voter.Dag, region: str, key: str, parents: tuple[bytes, ...],
                     version: bytes, value: dict) -> None:
        metas = [dag.versions[p] for p in parents]
        meta = VersionMeta(version, tuple(sorted(parents)), "", 1 + max(m.gen for m in metas),
                           max(m.hlc for m in metas), True)
        self.store.add_version(region, key, version, meta.parents, value, "", meta.hlc, meta.gen)
        dag.add(meta)
        self.trace.record("merged", region=region, key=key, version=version, parents=list(meta.parents))
        self.counters["merges"] += 1

    def _materialize(self, region: str, key: str, parents: list[bytes], expected: bytes) -> bool:
        """Rebuild a merge a peer built on or voted for, once all its parents are here."""
        if self.store.has_version(expected) or not all(self.store.has_version(p) for p in parents):
            return False
        dag = self._dag(region, key)
        if not all(p in dag.versions for p in parents):
            return False
        result = self._merge_value(dag, region, key, tuple(parents))
        if result is None or result[0] != expected:
            self.counters["bad-merge"] += 1
            log.warning("merge %s of %s/%s does not rebuild here", expected.hex()[:16], region, key)
            return False
        self._store_merge(dag, region, key, tuple(parents), *result)
        return True

    def _window(self, region: str, key: str, frame: Frame) -> voter.Dag:
        """The part of a frame's history a decision needs: once the frame is settled on an
        authored consensus version, that version and what descends from it; otherwise all."""
        if frame.settled:
            metas = self.store.frame_meta_from(region, key, frame.consensus)
            meta = metas.get(frame.consensus)
            # (A merge consensus needs its branches: its parents are the leaves.) Anything
            # here not descending from the consensus (a fork from further back) needs the
            # whole history for its common ancestor.
            if meta is not None and not meta.is_merge and all(
                    v == frame.consensus or all(p in metas for p in m.parents) for v, m in metas.items()):
                return voter.Dag(metas)
        return self._dag(region, key)

    def _decide(self, region: str, key: str, readonly: bool = False, frame: Frame | None = None) -> voter.Decision:
        frame = frame or self.store.frame(region, key)
        dag = self._window(region, key, frame)
        counts = self._counts(self.store.flagged())
        eligible = dag.eligible(counts)
        votes = {v: w for v, w in self.store.latest_votes(region, key).items() if counts(v)}

        def history() -> dict[str, list[bytes]]:
            return {v: ws for v, ws in self.store.votes_in_order(region, key).items() if counts(v)}
        cache: dict[tuple[bytes, ...], tuple[bytes, dict] | None] = {}

        def try_merge(parents: tuple[bytes, ...]) -> bytes | None:
            parents = tuple(sorted(parents))
            stored = self.store.merge_of(parents)
            if stored is not None:
                return stored
            if parents not in cache:
                cache[parents] = self._merge_value(dag, region, key, parents)
            return cache[parents] and cache[parents][0]

        if readonly:
            head, leaves = frame.head, voter.choose_head(dag, eligible, history,
                                                         lambda p: self.store.merge_of(tuple(sorted(p))))[1]
            return voter.decide(dag, eligible, votes, self.quorum(region), head, leaves, frame.consensus)
        head, leaves = voter.choose_head(dag, eligible, history, try_merge)
        if head is not None and head not in dag.versions:
            parents = next(p for p, r in cache.items() if r and r[0] == head)
            self._store_merge(dag, region, key, parents, head, cache[parents][1])
            eligible.add(head)
        round_ = self._round_now(region, key, frame)
        if head is not None and votes.get(self.node_id) != head and self._votes_here(region, counts) \
                and self._round_left(round_):
            round_ += 1
            body = {"key": key, "version": head, "round": round_}
            if dag.versions[head].is_merge:
                body["merge"] = list(dag.versions[head].parents)
            author = dag.versions[head].author
            env = self._send("vote", region, body, self.relay.vote_topic(region, author))
            if author == self.node_id:
                self.relay.own_vote(env.msg_id)
            self._own_votes[env.msg_id] = (region, key, round_)  # (its envelope once signed: Node._seal)
            self._voted(region, key, round_, head, None, body.get("merge"))
            votes[self.node_id] = head
        decision = voter.decide(dag, eligible, votes, self.quorum(region), head, leaves, frame.consensus)
        decision.round = round_
        c = decision.consensus
        if c is not None:
            below = dag.ancestors(c)
            c_gen = dag.versions[c].gen
            decision.settled = all(v in below for v, m in dag.versions.items() if m.gen < c_gen)
        return decision

    def _voted(self, region: str, key: str, round_: int, version: bytes, envelope: bytes | None,
               merge: list[bytes] | None = None) -> None:
        """Store and trace this node's vote (the message id of the diff of its write, which is
        the vote; None for a vote message, whose envelope is stored as it is signed)."""
        self.store.add_vote(region, key, self.node_id, round_, version, envelope, merge)
        self.trace.record("voted", region=region, key=key, version=version, round=round_)

    def _votes_here(self, region: str, counts: Callable[[str], bool] | None = None) -> bool:
        """Whether this node's votes count in a region (a member, not flagged)."""
        counts = counts or self._counts(self.store.flagged())
        return counts(self.node_id) and self.node_id in self.members(region)

    def _own_round(self, region: str, key: str, frame: Frame) -> int | None:
        """The round of the vote a write of this node casts for its new version (carried in
        its diff: node.votes_in_diffs), or None when it casts none there."""
        if not self.config.votes_in_diffs or not self._votes_here(region):
            return None
        round_ = self._round_now(region, key, frame)
        return round_ + 1 if self._round_left(round_) else None

    def _round_left(self, round_: int) -> bool:
        """Whether a vote can follow one in `round_`. A node's rounds on a frame end at
        MAX_ROUND (a frame written a hundred times a second for sixteen months): its writes
        of it still go out, with no vote of its own (the other members decide), counted."""
        if round_ < MAX_ROUND:
            return True
        self.counters["votes.rounds-spent"] += 1
        return False

    def _round_now(self, region: str, key: str, frame: Frame) -> int:
        """The round of this node's latest vote on a frame, as far as it knows: its frame's,
        the floor (above a restored node's old rounds: restart.py), or that of an own vote
        that came back (a restored node learns its old votes back by anti-entropy, and a
        frame changed more than four times a second outruns the floor's clock)."""
        return max(frame.round, self.round_floor, self.store.latest_round(region, key, self.node_id))

    def compact_votes(self, limit: int = COMPACT_PER_ROUND, batch: int = 256) -> int:
        """Drop the votes no decision reads again from the frames decided since the last
        call, `limit` frames at most (the rest wait for the next: the scheduled round's
        job, after a heal that brought many); how many votes went. See _compactable."""
        dropped = done = 0
        while done < limit and (frames := self.store.decided_frames(min(batch, limit - done))):
            done += len(frames)
            for region, key in frames:
                with self.store.transaction():
                    dropped += self.store.drop_votes(region, key, self._compactable(region, key))
        self.counters["votes-compacted"] += dropped
        return dropped

    def _compactable(self, region: str, key: str) -> list[tuple[str, int]]:
        """(voter, round) of the votes on a frame that no decision reads again.

        Fork choice reads, at a fork, each member's first vote after it, and a decision
        reads each member's latest vote. A vote can go when the member's next vote is for
        an eligible authored version that descends from it: that one lies under a leaf, so
        it lies after any fork the dropped one lies after, on the same branch, and the
        first vote after every fork counts as before (a fork brought later by anti-entropy
        too). So can, on a frame settled on a consensus, the votes for versions below it
        before a member's first vote for an eligible authored version from the consensus
        on, when they are all below it. (Not covered: an author revoked afterwards whose
        version was such a next vote.) What stays: each member's latest vote, the votes
        it moved away from (to another branch, or to a merge) and, on a settled frame,
        nothing below the consensus. A vote that comes late for a round dropped here is
        stored as any late vote, and dropped again; a second vote in such a round goes
        unflagged, as no decision reads that round any more."""
        frame = self.store.frame(region, key)
        dag = self._window(region, key, frame)
        eligible = dag.eligible(self._counts(self.store.flagged()))
        authored = {v for v in eligible if not dag.versions[v].is_merge}
        settled = frame.settled and frame.consensus in dag.versions
        if settled:
            floor = dag.versions[frame.consensus].gen
            ahead = dag.descendants(frame.consensus) & authored
        dropped = []
        for voter_id, rows in self.store.vote_rows(region, key).items():
            first = 0
            if settled:
                first = next((i for i, (_, version, _) in enumerate(rows) if version in ahead), 0)
                if not all(gen is not None and gen < floor for _, _, gen in rows[:first]):
                    first = 0
            dropped += [(voter_id, rows[i][0]) for i in range(first)]
            dropped += [(voter_id, r) for i, (r, version, _) in enumerate(rows[:-1]) if i >= first
                        and rows[i + 1][1] in authored and version in dag.ancestors(rows[i + 1][1])]
        return dropped

    def _after_writes(self, region: str, key: str, was: Frame) -> None:
        """After this node's own writes on a frame, a chain on its head as it `was`: when
        the frame's last decision found that head its single leaf, and this node's vote went
        with the last write, only the head moves. The new versions are shadows (stored so),
        a version only this node's vote supports reaches no quorum of two or more, and the
        consensus and every other state stay: the decision is not made again. Else, and
        whenever anything else could have changed (diffs waiting, a single-member quorum),
        _reconsider."""
        frame = self.store.frame(region, key)
        if was.head is None or self._linear.get((region, key)) != was.head or frame.round == was.round \
                or self.quorum(region) < 2 or self.store.waiting(region, key):
            self._reconsider(region, key, was)
            return
        self._single_leaf(region, key, frame.head)
        self.counters["decisions-skipped"] += 1
        if self._subscribers:
            self._events.append(self.store.version(frame.head))

    def _single_leaf(self, region: str, key: str, head: bytes | None) -> None:
        """Remember the single leaf a decision found on a frame (None: not one)."""
        linear = self._linear
        linear.pop((region, key), None)
        if head is not None:
            if len(linear) >= LINEAR_FRAMES:
                del linear[next(iter(linear))]
            linear[(region, key)] = head

    def _reconsider(self, region: str, key: str, was: Frame | None = None) -> None:
        """Recompute head, own vote and consensus of a frame after any change to it (or to
        several: `was` is the frame before the first, for the notices)."""
        self._catch_up(region, key)
        now = self.store.frame(region, key)
        before = was or now
        d = self._decide(region, key, frame=now)
        self.store.set_frame(region, key, Frame(d.head, d.consensus, d.round, d.settled))
        self._single_leaf(region, key, d.head if d.head is not None and not d.forks
                          and not d.dag.versions[d.head].is_merge else None)
        dag = d.dag
        self.store.set_states({v: st for v, st in d.states.items()
                               if v not in dag.versions or dag.versions[v].state != st})
        notify = bool(self._subscribers)  # (a version is read back only for someone to tell)
        if d.head != before.head and d.head is not None and notify:
            self._events.append(self.store.version(d.head))
        if d.consensus != before.consensus and d.consensus is not None:
            self.counters["consensus"] += 1
            self.relay.reached()
            self.trace.record("consensus", region=region, key=key, version=d.consensus, resolution=d.resolution)
            if d.resolution:
                self.counters["fork-resolutions"] += 1
                log.warning("%s/%s: consensus moves to another branch, %s -> %s", region, key,
                            before.consensus.hex()[:16] if before.consensus else None, d.consensus.hex()[:16])
            if notify:
                self._events.append(self.store.version(d.consensus))
