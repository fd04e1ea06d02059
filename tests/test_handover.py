"""broker.auto: when the swarm's broker goes away, its nodes (real processes) elect one of
themselves to host the bus, move there, and move back when the broker returns; no write
made before, during or after is lost."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack, contextmanager

import pytest

from edgeswarm.broker.embedded import free_port
from edgeswarm.node import Config
from edgeswarm.node.config import ConfigError
from edgeswarm.node.harness import NodeProcess
from edgeswarm.shared.identity import Identity

from helpers import same_digest

TIMEOUT = 60.0


@contextmanager
def broker_process(port: int):
    """`edgeswarm broker` in its own process, as on the site's broker box."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeswarm.node.cli", "broker", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_the_swarm_elects_a_host_when_its_broker_dies_and_moves_back_when_it_returns(tmp_path, region):
    port = free_port()
    homes = [tmp_path / f"n{i}" for i in range(3)]
    ids = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    first = min(range(3), key=lambda i: ids[i])  # the rule: the lowest node id among live candidates
    auto_ports = [free_port() for _ in homes]

    def config(i):
        return Config(home=homes[i], regions=[region], broker_port=port, members=ids, sync_interval=2,
                      snapshot_interval=0, broker_auto=True, auto_port=auto_ports[i], auto_address="127.0.0.1")

    with ExitStack() as stack:
        original = stack.enter_context(broker_process(port))
        nodes = [stack.enter_context(NodeProcess(config(i))) for i in range(3)]
        for n in nodes:  # each knows where the others' brokers would be (from their births)
            assert n.wait_bus_hosts(2, TIMEOUT), n.counters()
        before = nodes[0].put(region, "before", {"i": 0})
        assert all(n.wait_versions([before], TIMEOUT) for n in nodes)

        original.kill()
        original.wait(10)
        writer = nodes[(first + 1) % 3]
        during = writer.put(region, "during", {"i": 1})  # in its outbox until it has a broker again
        assert nodes[first].wait_hosting(True, TIMEOUT), nodes[first].counters()
        for n in nodes:
            assert n.wait_bus(auto_ports[first], TIMEOUT), n.bus()
        assert [n.bus()["hosting"] for n in nodes].count(True) == 1
        on_host = nodes[(first + 2) % 3].put(region, "on-host", {"i": 2})
        assert all(n.wait_versions([during, on_host], TIMEOUT) for n in nodes), [n.counters() for n in nodes]

        original = stack.enter_context(broker_process(port))  # the broker box is back
        for n in nodes:
            assert n.wait_bus(port, TIMEOUT), n.bus()
        assert nodes[first].wait_hosting(False, TIMEOUT)
        after = nodes[first].put(region, "after", {"i": 3})
        versions = [before, during, on_host, after]
        assert all(n.wait_versions(versions, TIMEOUT) for n in nodes), [n.counters() for n in nodes]
        keys = ["before", "during", "on-host", "after"]
        for n in nodes:
            assert n.wait_consensus(region, dict(zip(keys, versions)), TIMEOUT), n.status(region, keys)
        assert same_digest(nodes, region, TIMEOUT)


def test_when_the_elected_host_dies_the_next_one_hosts(tmp_path, region):
    port = free_port()
    homes = [tmp_path / f"n{i}" for i in range(3)]
    ids = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    ranked = sorted(range(3), key=lambda i: ids[i])
    auto_ports = [free_port() for _ in homes]
    with ExitStack() as stack:
        original = stack.enter_context(broker_process(port))
        nodes = [stack.enter_context(NodeProcess(Config(
            home=homes[i], regions=[region], broker_port=port, members=ids, sync_interval=2, snapshot_interval=0,
            broker_auto=True, auto_port=auto_ports[i], auto_address="127.0.0.1"))) for i in range(3)]
        for n in nodes:
            assert n.wait_bus_hosts(2, TIMEOUT), n.counters()
        original.kill()
        original.wait(10)
        host, second, third = (nodes[i] for i in ranked)
        assert host.wait_hosting(True, TIMEOUT)
        assert all(n.wait_bus(auto_ports[ranked[0]], TIMEOUT) for n in nodes)

        host.kill()  # the board hosting the bus loses power
        written = third.put(region, "k", {"after": "host lost"})
        assert second.wait_hosting(True, TIMEOUT), second.counters()
        for n in (second, third):
            assert n.wait_bus(auto_ports[ranked[1]], TIMEOUT), n.bus()
        assert second.wait_versions([written], TIMEOUT), second.counters()


def test_a_node_restarting_during_the_outage_joins_the_host_instead_of_hosting(tmp_path, region):
    """It ranks first, but a broker is already hosted: it joins that one (it learnt where
    from births before the outage, kept in its home across the restart)."""
    port = free_port()
    homes = [tmp_path / f"n{i}" for i in range(2)]
    ids = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    first, other = sorted(range(2), key=lambda i: ids[i])
    auto_ports = [free_port() for _ in homes]

    def config(i):
        return Config(home=homes[i], regions=[region], broker_port=port, members=ids, quorum=1, sync_interval=2,
                      snapshot_interval=0, broker_auto=True, auto_port=auto_ports[i], auto_address="127.0.0.1")
    with ExitStack() as stack:
        original = stack.enter_context(broker_process(port))
        host = stack.enter_context(NodeProcess(config(other)))
        restarting = NodeProcess(config(first)).start()
        assert restarting.wait_bus_hosts(1, TIMEOUT) and host.wait_bus_hosts(1, TIMEOUT)
        restarting.stop()  # a clean stop: its death is seen, so the other no longer counts it
        original.kill()
        original.wait(10)
        assert host.wait_hosting(True, TIMEOUT), host.counters()

        rejoined = stack.enter_context(NodeProcess(config(first)))  # no broker answers at its start
        assert rejoined.wait_bus(auto_ports[other], TIMEOUT), rejoined.bus()
        assert rejoined.counters().get("handover.hosted", 0) == 0 and not rejoined.bus()["hosting"]
        version = rejoined.put(region, "k", {"back": True})
        assert host.wait_versions([version], TIMEOUT), host.counters()


def test_a_node_alone_starts_and_hosts_when_no_broker_answers(tmp_path, region):
    """Started with its broker down and no peer known, a node elects itself rather than fail."""
    port, own = free_port(), free_port()
    config = Config(home=tmp_path / "n", regions=[region], broker_port=port, sync_interval=0, snapshot_interval=0,
                    broker_auto=True, auto_port=own, auto_address="127.0.0.1")
    with NodeProcess(config) as n:
        assert n.wait_hosting(True, TIMEOUT)
        assert n.wait_bus(own, TIMEOUT), n.bus()
        version = n.put(region, "k", {"v": 1})
        assert n.wait_published(TIMEOUT)
        assert n.has_versions([version])


def test_auto_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="protocol cannot be 5"):
        Config(home=tmp_path, broker_auto=True, protocol="5")
    with pytest.raises(ConfigError, match="needs no election"):
        Config(home=tmp_path, broker_auto=True, embedded_broker=True)
    with pytest.raises(ConfigError, match="auto_port"):
        Config(home=tmp_path, broker_auto=True, auto_port=0)
    config = Config(home=tmp_path, broker_auto=True, auto_port=1884, auto_address="10.0.0.7")
    config.save()
    again = Config.load(tmp_path)
    assert (again.broker_auto, again.auto_port, again.auto_address) == (True, 1884, "10.0.0.7")
