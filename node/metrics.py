"""Swarm metrics, computed by a node from its own store.

- convergence: for frames with a consensus, the share of members whose latest vote is for
  that consensus version (1.0: every member agrees), averaged over frames;
- conflict_rate: the share of frames that have at least one fork version;
- access latency: for the frames this node wrote, milliseconds from its `wrote` trace entry
  to its `consensus` entry for the same version (p50, p99 and count);
- trace_depth: for each consensus version, how many nodes' traces (this node's and the
  copies fetched from peers) record having written, accepted or voted for it — the number
  of independent confirmations — averaged over frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeswarm.shared.clock import wall_ms

if TYPE_CHECKING:
    from .node import Node

_CONFIRMING = {"wrote", "accepted", "voted"}


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def compute(node: Node) -> dict:
    store = node.store
    frames = store.frame_heads()  # (region, key, head, consensus)
    with_consensus = [(r, k, bytes.fromhex(c)) for r, k, _, c in frames if c]

    agreement = []
    for region, key, consensus in with_consensus:
        members = node.members(region)
        votes = store.latest_votes(region, key)
        agreement.append(sum(1 for m in members if votes.get(m) == consensus) / max(1, len(members)))

    forked = store.frames_with_forks()

    wrote: dict[bytes, int] = {}
    reached: dict[bytes, int] = {}
    confirmations: dict[bytes, set[str]] = {}
    for node_id in {node.node_id, *store.traced_nodes()}:
        for entry in node.trace.entries(node_id):
            for event, hlc, data in entry.events:
                version = data.get("version") if isinstance(data, dict) else None
                if not isinstance(version, bytes):
                    continue
                if event in _CONFIRMING:
                    confirmations.setdefault(version, set()).add(node_id)
                if node_id == node.node_id:
                    if event == "wrote":
                        wrote[version] = hlc
                    elif event == "consensus":
                        reached.setdefault(version, hlc)
    latencies = [float(wall_ms(reached[v]) - wall_ms(t)) for v, t in wrote.items() if v in reached]
    depth = [len(confirmations.get(c, ())) for _, _, c in with_consensus]

    return {
        "node": node.node_id,
        "frames": len(frames),
        "frames_at_consensus": len(with_consensus),
        "convergence": round(sum(agreement) / len(agreement), 4) if agreement else None,
        "conflict_rate": round(forked / len(frames), 4) if frames else None,
        "access_latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                              "count": len(latencies)},
        "trace_depth": round(sum(depth) / len(depth), 2) if depth else None,
    }
