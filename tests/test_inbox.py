"""Where a node handles what it receives: a lone diff in the network thread when nothing else
is going on, everything else in order through the inbox worker; the network thread never
waits for the store."""

from __future__ import annotations

import threading
import time

from edgeswarm.shared.topics import region_topic

from test_consensus import TIMEOUT, consensus_everywhere


def handled_in(node, region):
    """The names of the threads that tell this node's subscribers of new heads (a version's
    first notice: a shadow, or at once consensus when the writer's vote in the diff and this
    node's make the quorum)."""
    names, seen, told = [], threading.Event(), set()

    def on_change(fv) -> None:
        if fv.version not in told:
            told.add(fv.version)
            names.append(threading.current_thread().name)
            seen.set()
    node.subscribe(on_change, region)
    return names, seen


def poll(condition, timeout: float = TIMEOUT) -> bool:
    """For a state no event announces (the worker that would announce it is held up)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_lone_diff_is_handled_in_the_network_thread(make_swarm, region):
    (a, b), _ = make_swarm(2)
    names, seen = handled_in(b, region)
    # (b is busy for a while after starting: what the others announce, its first digests;
    # a diff that comes meanwhile waits its turn in the inbox, so three writes, each once b
    # has nothing left to do)
    for i in range(3):
        assert poll(lambda: b._queued == 0 and b._inbox.empty() and not b._working.locked())
        seen.clear()
        version = a.put(region, "valve", {"open": i})
        assert seen.wait(TIMEOUT)
        consensus_everywhere([a, b], region, "valve", version)
        # (b's consensus comes with the diff, which holds a's vote; a then passes b's vote on
        # to the region, and that relay must not meet the next diff in b's inbox)
        assert b.wait_until(lambda i=i: b.counters["own.relayed"] > i, TIMEOUT), b.counters
    assert len(names) == 3 and not all(n.startswith("edgeswarm-inbox") for n in names), names


def test_diffs_wait_in_order_while_another_thread_uses_the_store(make_swarm, region):
    (a, b), _ = make_swarm(2)
    names, seen = handled_in(b, region)
    arrived = []  # the diff topics b's network thread was given
    give = b.transport.on_message
    b.transport.on_message = lambda topic, payload: (arrived.append(topic), give(topic, payload))
    diffs = region_topic("diff", region)
    with b.store.transaction():  # another thread of b's (a snapshot, say) is using its store
        v1 = a.put(region, "valve", {"open": True})
        v2 = a.patch(region, "valve", set={"open": False})
        # b's network thread goes on reading: both diffs wait in the inbox, none is handled
        assert poll(lambda: arrived.count(diffs) == 2 and b._queued >= 2), (arrived, b._queued)
        assert not seen.is_set() and b.head(region, "valve") is None
    consensus_everywhere([a, b], region, "valve", v2)
    assert names and all(n.startswith("edgeswarm-inbox") for n in names), names
    assert b.store.version(bytes.fromhex(v1)) is not None and poll(lambda: b._queued == 0)
