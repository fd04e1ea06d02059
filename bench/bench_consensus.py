"""Consensus latency: from a write on one node until all five nodes hold it as consensus.

    python bench/bench_consensus.py [--writes 200] [--nodes 5]

Two layouts, each against the embedded broker and then against a private Mosquitto
(broker/mosquitto.py: set_tcp_nodelay) when mosquitto is installed, or --broker HOST:PORT:
- processes: one node per process, as on boards (the writer here, the others children
  that report when they reach consensus; CLOCK_MONOTONIC is shared by all processes);
- in-process: all nodes in this one interpreter, sharing one lock (pessimistic).
Writes are sequential: each waits for the previous one's consensus everywhere. Prints
p50, p99 and max in milliseconds. On a 2-core machine the nodes and the broker compete
for the same cores.

Next to them, the floor of one quorum round on this machine and broker: as many plain
paho processes, one publishing a signed 300-byte message and each other checking its
Ed25519 signature and answering with a signed reply (what a vote needs at the least);
the time until the quorum's replies (a majority, the sender's own included) and all of
them have come back. What edgeswarm spends above it is each node's handling (store,
voter, trace, outbox) and the hand-overs between its threads.
"""

from __future__ import annotations

import argparse
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.broker.mosquitto import MosquittoProcess, find_mosquitto
from edgeswarm.node import Config, Node
from edgeswarm.node.metrics import percentile
from edgeswarm.shared.identity import Identity


def run(name: str, host: str, port: int, protocol: str, n_nodes: int, writes: int, warmup: int) -> None:
    region = f"bench/consensus/{int(time.time() * 1000)}"
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / f"n{i}" for i in range(n_nodes)]
        members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
        nodes = [Node(Config(home=h, regions=[region], broker_host=host, broker_port=port, protocol=protocol,
                             members=members)).start() for h in homes]
        target: list[str | None] = [None]
        reached: dict[str, float] = {}
        lock = threading.Lock()
        done = threading.Event()

        def watcher(node_id: str):
            def on_change(fv) -> None:
                if fv.state == "consensus" and fv.version == target[0]:
                    with lock:
                        reached.setdefault(node_id, time.perf_counter())
                        if len(reached) == n_nodes:
                            done.set()
            return on_change

        for n in nodes:
            n.subscribe(watcher(n.node_id), region)
        latencies, writer_latencies = [], []
        try:
            for i in range(warmup + writes):
                writer = nodes[i % n_nodes]
                with lock:
                    reached.clear()
                    done.clear()
                t0 = time.perf_counter()
                version = writer.patch(region, "counter", set={"i": i, "by": writer.node_id})
                with lock:
                    target[0] = version
                    # the writer's own callback may have fired before target was set
                    if (c := writer.consensus(region, "counter")) is not None and c.version == version:
                        reached.setdefault(writer.node_id, time.perf_counter())
                if not done.wait(30):
                    raise SystemExit(f"{name}: write {i} did not reach consensus on all nodes in 30 s")
                if i >= warmup:
                    latencies.append((max(reached.values()) - t0) * 1000)
                    writer_latencies.append((reached[writer.node_id] - t0) * 1000)
        finally:
            for n in nodes:
                n.stop()
    _print(f"{name}, in-process", n_nodes, writes, latencies, writer_latencies)


def peer(home: str, host: str, port: int, protocol: str, region: str, members: list[str]) -> None:
    """A child process: one node that prints a line whenever it reaches a consensus."""
    node = Node(Config(home=Path(home), regions=[region], broker_host=host, broker_port=port, protocol=protocol,
                       members=members))
    out = threading.Lock()

    def report(fv) -> None:
        if fv.state == "consensus":
            with out:
                print(f"consensus {fv.version} {time.monotonic_ns()}", flush=True)

    node.subscribe(report, region)
    node.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    node.stop()


def run_processes(name: str, host: str, port: int, protocol: str, n_nodes: int, writes: int, warmup: int) -> None:
    region = f"bench/consensus/{int(time.time() * 1000)}"
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / f"n{i}" for i in range(n_nodes)]
        members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
        reports: queue.Queue[tuple[str, int]] = queue.Queue()
        children = []
        for home in homes[1:]:
            child = subprocess.Popen(
                [sys.executable, __file__, "--peer", str(home), "--host", host, "--port", str(port),
                 "--protocol", protocol, "--region", region, "--members", ",".join(members)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if child.stdout.readline().strip() != "ready":
                raise SystemExit(f"{name}: a peer process failed to start")
            threading.Thread(target=lambda c=child: [reports.put((ln.split()[1], int(ln.split()[2])))
                                                     for ln in c.stdout if ln.startswith("consensus")],
                             daemon=True).start()
            children.append(child)
        writer = Node(Config(home=homes[0], regions=[region], broker_host=host, broker_port=port,
                             protocol=protocol, members=members))
        mine: queue.Queue[tuple[str, int]] = queue.Queue()
        writer.subscribe(lambda fv: fv.state == "consensus" and mine.put((fv.version, time.monotonic_ns())), region)
        writer.start()
        latencies, writer_latencies = [], []
        try:
            for i in range(warmup + writes):
                t0 = time.monotonic_ns()
                version = writer.patch(region, "counter", set={"i": i})
                seen: dict[str, int] = {}
                deadline = time.monotonic() + 30
                while len(seen) < n_nodes - 1:
                    v, t = reports.get(timeout=max(0.01, deadline - time.monotonic()))
                    if v == version:
                        seen[f"peer{len(seen)}"] = t
                while True:
                    v, t_writer = mine.get(timeout=max(0.01, deadline - time.monotonic()))
                    if v == version:
                        break
                if i >= warmup:
                    latencies.append((max(max(seen.values()), t_writer) - t0) / 1e6)
                    writer_latencies.append((t_writer - t0) / 1e6)
        finally:
            writer.stop()
            for child in children:
                child.stdin.close()
                child.wait(10)
    _print(f"{name}, processes", n_nodes, writes, latencies, writer_latencies)


def _subscribed(host: str, port: int, protocol: str, topic: str, on_message):
    """A plain paho client of the floor, connected as a node's connection is (TCP_NODELAY),
    subscribed to `topic` and handing its messages to `on_message(client, message)`."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311 if protocol == "3.1.1" else mqtt.MQTTv5)
    subscribed = threading.Event()
    client.on_message = lambda c, userdata, message: on_message(c, message)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.connect(host, port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit(f"the floor's client could not subscribe to {topic}")
    return client


def echo_peer(host: str, port: int, protocol: str, index: int, sender: str) -> None:
    """A child process of the floor: check each request's signature, answer it signed."""
    from nacl.signing import SigningKey, VerifyKey

    me, theirs = SigningKey.generate(), VerifyKey(bytes.fromhex(sender))

    def answer(c, message) -> None:
        c.publish(f"floor/reply/{index}", me.sign(theirs.verify(message.payload)[:32]), qos=1)

    client = _subscribed(host, port, protocol, "floor/request", answer)
    print("ready", flush=True)
    sys.stdin.read()
    client.disconnect()
    client.loop_stop()


def floor(name: str, host: str, port: int, protocol: str, n_nodes: int, rounds: int, warmup: int) -> None:
    """The floor of one quorum round (see the module's text), printed as one line."""
    from nacl.signing import SigningKey

    me = SigningKey.generate()
    children = []
    try:
        for i in range(n_nodes - 1):
            child = subprocess.Popen([sys.executable, __file__, "--echo", str(i), "--host", host, "--port", str(port),
                                      "--protocol", protocol, "--members", me.verify_key.encode().hex()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            children.append(child)
            if child.stdout.readline().strip() != "ready":
                raise SystemExit(f"{name}: a floor process failed to start")
        lock, replies = threading.Lock(), []
        quorum_in, all_in = threading.Event(), threading.Event()
        quorum = n_nodes // 2  # replies: with the sender's own, a majority

        def count(c, message) -> None:
            with lock:
                replies.append(time.perf_counter())
                if len(replies) == quorum:
                    quorum_in.set()
                if len(replies) == n_nodes - 1:
                    all_in.set()

        client = _subscribed(host, port, protocol, "floor/reply/+", count)
        to_quorum, to_all = [], []
        for i in range(warmup + rounds):
            with lock:
                replies.clear()
                quorum_in.clear()
                all_in.clear()
            t0 = time.perf_counter()
            client.publish("floor/request", me.sign(i.to_bytes(8, "big") * 37 + b"xxxx"), qos=1)
            if not (quorum_in.wait(30) and all_in.wait(30)):
                raise SystemExit(f"{name}: floor replies missing")
            if i >= warmup:
                to_quorum.append((replies[quorum - 1] - t0) * 1000)
                to_all.append((replies[-1] - t0) * 1000)
        client.disconnect()
        client.loop_stop()
    finally:
        for child in children:
            child.stdin.close()
            child.wait(10)
    print(f"{name:<21} floor, {n_nodes} paho processes, {rounds} rounds: quorum of replies p50 "
          f"{percentile(to_quorum, 50):.1f} ms, p99 {percentile(to_quorum, 99):.1f} ms; all replies p50 "
          f"{percentile(to_all, 50):.1f} ms, p99 {percentile(to_all, 99):.1f} ms")


def _print(name: str, n_nodes: int, writes: int, latencies: list[float], writer_latencies: list[float]) -> None:
    print(f"{name:<21} {n_nodes} nodes, {writes} writes: write -> consensus on all nodes "
          f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
          f"max {max(latencies):.1f} ms; on the writer p50 {percentile(writer_latencies, 50):.1f} ms, "
          f"p99 {percentile(writer_latencies, 99):.1f} ms; p50 of the first and last tenth "
          f"{percentile(latencies[:len(latencies) // 10], 50):.1f} / {percentile(latencies[-len(latencies) // 10:], 50):.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--broker", metavar="HOST:PORT", help="measure this broker instead (e.g. a Mosquitto with "
                                                         "set_tcp_nodelay true)")
    p.add_argument("--peer", help=argparse.SUPPRESS)  # child mode: the node's home
    p.add_argument("--echo", type=int, help=argparse.SUPPRESS)  # child mode: a floor process
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    p.add_argument("--region", help=argparse.SUPPRESS)
    p.add_argument("--members", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer:
        return peer(args.peer, args.host, args.port, args.protocol, args.region, args.members.split(","))
    if args.echo is not None:
        return echo_peer(args.host, args.port, args.protocol, args.echo, args.members)
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        for runner in (run_processes, run, floor):
            runner(args.broker, host, int(port), "auto", args.nodes, args.writes, args.warmup)
        return
    for runner in (run_processes, run, floor):
        with EmbeddedBroker() as broker:
            runner("embedded", broker.host, broker.port, "3.1.1", args.nodes, args.writes, args.warmup)
    if find_mosquitto() is None:
        print("mosquitto skipped: not installed (or measure one with --broker HOST:PORT)")
        return
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp)) as mosquitto:  # (set_tcp_nodelay)
        for runner in (run_processes, run, floor):
            runner("mosquitto", mosquitto.host, mosquitto.port, "auto", args.nodes, args.writes, args.warmup)


if __name__ == "__main__":
    main()
