"""The local consensus voter: fork choice, merges and consensus for one frame.

Pure decisions over a snapshot of a frame's version graph and its latest votes; the node
stores what they produce. Every node given the same versions and votes decides the same.

- Eligible versions: coherent, authored by a member that is not flagged (merges: all
  parents eligible), with every ancestor eligible. Only eligible versions are voted for.
- Leaves: eligible authored versions that no other eligible authored version descends
  from (merges are transparent: a merge joins branches only once someone builds on it).
- Fork choice: at the leaves' common ancestor (the fork) they fall into branches; a branch
  scores the members whose *first* vote after the fork lies on it, ties going to the
  branch whose first version has the lower hash; inside the best branch the same again
  below its own fork, and so on. A branch the swarm backed early keeps its place: first
  votes never change, so the tally cannot swing back and forth (counting latest votes lets
  nodes that learn of each other's switches in lockstep flip forever), and a branch's
  first version stays as the branch grows (a leaf's own hash changes with every write on
  it: ranking by it flipped the swarm between branches as they were written on). A fork
  inside a branch is decided by the votes cast after it, not by those from before it. (When
  the leaves share versions after their fork all round, merges across it, each leaf is a
  branch of its own and a vote counts where it lies on one of them alone.) The
  best leaf is joined by every other leaf that merges cleanly with it (three-way merge
  from their common ancestor, coherent result); the merge of that set is the head. Leaves
  that conflict stay as forks.
- Support of a version: members whose latest vote is that version or a descendant.
- Consensus: the deepest version (generation, then lower hash) with support >= quorum.
  While the current consensus keeps a quorum it only moves forward, to a descendant (or a
  merge containing it). When the members' latest votes leave it, it follows them, and a
  move that does not extend it is counted as an explicit fork resolution.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .store import VersionMeta

# try_merge(parents) -> the merge's version hash, or None when the parents conflict.
TryMerge = Callable[[tuple[bytes, ...]], "bytes | None"]


class Dag:
    def __init__(self, versions: dict[bytes, VersionMeta]) -> None:
        self.versions = versions
        self._anc: dict[bytes, frozenset[bytes]] = {}
        self._children: dict[bytes, list[bytes]] | None = None

    def add(self, meta: VersionMeta) -> None:
        self.versions[meta.version] = meta
        self._children = None

    def ancestors(self, v: bytes) -> frozenset[bytes]:
        """`v` and every stored version it descends from (one walk, cached per version asked)."""
        found = self._anc.get(v)
        if found is None:
            seen, todo = {v}, [v]
            while todo:
                meta = self.versions.get(todo.pop())
                for p in meta.parents if meta else ():
                    if p not in seen and p in self.versions:
                        seen.add(p)
                        todo.append(p)
            found = self._anc[v] = frozenset(seen)
        return found

    def descendants(self, v: bytes) -> set[bytes]:
        """`v` and every stored version that descends from it."""
        if self._children is None:
            self._children = {}
            for meta in self.versions.values():
                for p in meta.parents:
                    self._children.setdefault(p, []).append(meta.version)
        seen, todo = {v}, [v]
        while todo:
            for c in self._children.get(todo.pop(), ()):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        return seen

    def lca(self, vs: Iterable[bytes]) -> bytes | None:
        """The nearest common ancestor (deepest generation, then lower hash), or None."""
        common = None
        for v in vs:
            common = set(self.ancestors(v)) if common is None else common & self.ancestors(v)
        if not common:
            return None
        return min(common, key=lambda h: (-self.versions[h].gen, h))

    def eligible(self, authors_ok: Callable[[str], bool]) -> set[bytes]:
        ok: set[bytes] = set()
        for meta in sorted(self.versions.values(), key=lambda m: m.gen):
            # A parent outside this graph lies below a settled consensus: eligible.
            if not meta.coherent or not all(p in ok or p not in self.versions for p in meta.parents):
                continue
            if meta.is_merge or authors_ok(meta.author):
                ok.add(meta.version)
        return ok


@dataclass
class Decision:
    head: bytes | None
    consensus: bytes | None
    resolution: bool = False
    forks: list[bytes] = field(default_factory=list)
    support: dict[bytes, int] = field(default_factory=dict)
    states: dict[bytes, str] = field(default_factory=dict)
    round: int = 0  # this node's vote round on the frame after the decision
    settled: bool = False  # every version older than the consensus is one of its ancestors
    dag: Dag | None = None


def choose_head(dag: Dag, eligible: set[bytes], votes: Callable[[], dict[str, list[bytes]]],
                try_merge: TryMerge) -> tuple[bytes | None, list[bytes]]:
    """(head, leaves ordered best first). `votes()`: each counted voter's votes in round
    order, asked for only when there is more than one leaf."""
    # A leaf: an authored version no other authored version descends from. One pass from
    # the newest generation down marks everything below an authored version.
    covered: set[bytes] = set()
    leaves = []
    for meta in sorted((dag.versions[v] for v in eligible), key=lambda m: -m.gen):
        if not meta.is_merge and meta.version not in covered:
            leaves.append(meta.version)
        if meta.version in covered or not meta.is_merge:
            covered.update(meta.parents)
    if len(leaves) < 2:
        return (leaves[0], leaves) if leaves else (None, [])

    order = _rank(dag, sorted(leaves), list(votes().values()))
    chosen, head = [order[0]], order[0]
    for leaf in order[1:]:
        merged = try_merge(tuple(chosen + [leaf]))
        if merged is not None:
            chosen.append(leaf)
            head = merged
    return head, order


def _rank(dag: Dag, leaves: list[bytes], history: list[list[bytes]]) -> list[bytes]:
    """Leaves best first. At their fork (common ancestor) the leaves fall into branches
    (leaves sharing a version after the fork are on one branch); a branch scores the
    members whose first vote after the fork lies on it, ties going to the branch whose
    first version has the lower hash (a branch keeps that as it grows, where a leaf's own
    hash changes with each write); then the same again inside each branch, below its own
    fork. When the leaves share versions after the fork all round (merges across it), each
    leaf is a branch of its own, and a vote counts where it lies on one of them alone."""
    if len(leaves) < 2:
        return leaves
    fork = dag.lca(leaves)
    before = dag.ancestors(fork) if fork is not None else frozenset()
    branches: list[tuple[set[bytes], list[bytes]]] = []  # (versions after the fork, leaves)
    for leaf in leaves:
        own, mine, apart = set(dag.ancestors(leaf) - before), [leaf], []
        for versions, members in branches:  # (branches are disjoint: only `own` can join them)
            if versions & own:
                own |= versions
                mine += members
            else:
                apart.append((versions, members))
        branches = apart + [(own, mine)]
    if len(branches) == 1:  # (a merge below every leaf: no fork to split them at) by leaf
        branches = [(set(dag.ancestors(leaf) - before), [leaf]) for leaf in leaves]
    # A member's first vote for a version on one branch alone (split by leaf, the branches
    # can share versions: a vote for one of those does not tell them apart).
    on = Counter(v for versions, _ in branches for v in versions)
    first = [next((w for w in ws if on[w] == 1), None) for ws in history]

    def rank(branch: tuple[set[bytes], list[bytes]]) -> tuple[int, bytes]:
        versions, _ = branch
        roots = [v for v in versions if not any(p in versions for p in dag.versions[v].parents)]
        return -sum(1 for w in first if w in versions), min(roots)

    return [leaf for branch in sorted(branches, key=rank) for leaf in _rank(dag, sorted(branch[1]), history)]


def decide(dag: Dag, eligible: set[bytes], votes: dict[str, bytes], quorum: int, head: bytes | None,
           leaves: list[bytes], current: bytes | None) -> Decision:
    """Consensus and states, once the head (and any merge it needed) is in `dag`."""
    counted = {voter: w for voter, w in votes.items() if w in eligible}
    support: dict[bytes, int] = {}
    for w in counted.values():
        for v in dag.ancestors(w):
            support[v] = support.get(v, 0) + 1
    candidates = [v for v, n in support.items() if n >= quorum and v in eligible]

    def deepest(vs: list[bytes]) -> bytes | None:
        return min(vs, key=lambda h: (-dag.versions[h].gen, h)) if vs else None

    def extends(v: bytes, base: bytes) -> bool:
        return base in dag.ancestors(v) or _covers(dag, v, base)

    consensus, resolution = current, False
    if current is None or current not in eligible:
        consensus = deepest(candidates)
        resolution = current is not None and consensus is not None
    elif current in candidates:
        # Still supported: only move forward. (Votes for a merge support both branches it
        # joins, so two branches can both have a quorum until the merge itself has one.)
        meta = dag.versions[current]
        ahead = dag.descendants(current)
        if meta.is_merge:  # a version holding all of a merge's parents also extends it
            ahead |= set.intersection(*(dag.descendants(p) for p in meta.parents))
        consensus = deepest([v for v in candidates if v in ahead]) or current
    else:
        # The members moved off the current consensus: every counted vote is a member's
        # latest, so this is not lag but the swarm resolving a fork (or dropping a merge
        # whose branches came to conflict).
        best = deepest(candidates)
        if best is not None:
            consensus, resolution = best, not extends(best, current)

    on_consensus = dag.ancestors(consensus) if consensus else frozenset()
    on_head = dag.ancestors(head) if head else frozenset()
    states = {}
    for v, meta in dag.versions.items():
        if not meta.coherent:
            states[v] = "rejected"
        elif v not in eligible:
            states[v] = "ineligible"
        elif v in on_consensus:
            states[v] = "consensus"
        elif v in on_head:
            states[v] = "shadow"
        else:
            states[v] = "superseded" if meta.is_merge else "fork"
    forks = [leaf for leaf in leaves if leaf not in on_head]
    return Decision(head, consensus, resolution, forks, support, states, dag=dag)


def _covers(dag: Dag, newer: bytes, older: bytes) -> bool:
    """`newer` contains everything `older` merged (older is a merge of newer's ancestors)."""
    meta = dag.versions[older]
    anc = dag.ancestors(newer)
    return meta.is_merge and all(p in anc for p in meta.parents)
