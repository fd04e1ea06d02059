"""Brokers side by side: edgeswarm against raw paho, and the embedded amqtt broker against Mosquitto.

    python bench/bench_brokers.py [--frames 3000] [--pairs 3] [--nodes 20] [--seconds 10] [--rate 2]

For each broker — the embedded amqtt broker, and a private Mosquitto with edgeswarm's
recommended settings when mosquitto is installed — measured in this one run:
  1. raw paho: one client publishes N payloads at QoS 1, another receives them; messages
     per second from the first publish to the last delivery. The payloads are signed diff
     envelopes of N frames: the same bytes edgeswarm sends for N writes;
  2. edgeswarm: a writer node process writes N frames, a reader node process follows the
     region (two processes, as two boards); frames per second from the first write until
     the reader has applied the last (each frame stored, signed, published, verified,
     applied, and voted on by both nodes), written one put at a time, and in batches of
     --batch (node.batch(): one transaction and one signed message for the batch, and one
     for the votes each node casts on it); the ratio to 1 is the share of raw MQTT
     throughput a swarm keeps (goal: 50 % or more);
  3. swarm-sim: `--nodes` node processes under the swarm-sim workload (node/swarmsim.py).
The raw and the batched runs alternate, `--pairs` times (3): a machine whose speed drifts
between two runs a few seconds apart (a shared 2-core box does, by tens of per cent) skews a
single ratio; each pair's ratio is printed, and the table gives the pair of the median
ratio, and every pair's ratio. The one-by-one run is compared with that pair's raw figure.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.broker.mosquitto import MosquittoProcess, find_mosquitto
from edgeswarm.node import Config
from edgeswarm.node.harness import NodeProcess
from edgeswarm.node.swarmsim import Workload, report, run
from edgeswarm.shared import diff
from edgeswarm.shared.envelope import encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import region_topic

KEYS = 50
TIMEOUT = 300.0


def frame_value(i: int) -> dict:
    return {"i": i, "reading": i * 0.5, "unit": "C"}


def signed_diffs(region: str, frames: int) -> list[bytes]:
    """The envelopes a node sends for `frames` writes to KEYS frames of `region`."""
    me, heads, out = Identity.generate(), {}, []
    for i in range(frames):
        key = f"k{i % KEYS}"
        parent, old = heads.get(key, (None, None))
        value = frame_value(i)
        version = diff.version_hash(region, key, parent, value)
        out.append(encode(me, "diff", region, i + 1, i + 1, {"key": key, "parent": parent, "version": version,
                                                             "ops": diff.make(old, value)}).raw)
        heads[key] = (version, value)
    return out


def raw_paho(host: str, port: int, protocol: int, topic: str, payloads: list[bytes]) -> float:
    """Messages per second, publish to delivery, of plain paho clients at QoS 1."""
    got, done = [0], threading.Event()

    def on_message(client, userdata, message) -> None:
        got[0] += 1
        if got[0] == len(payloads):
            done.set()

    clients = []
    for name in ("sub", "pub"):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        c.max_inflight_messages_set(100)  # as a node's connection
        connected = threading.Event()
        c.on_connect = lambda *a, e=connected: e.set()
        c.connect(host, port)
        c.loop_start()
        connected.wait(10)
        clients.append(c)
    sub, pub = clients
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = on_message
    sub.subscribe(topic, qos=1)
    subscribed.wait(10)
    t0 = time.perf_counter()
    for p in payloads:
        pub.publish(topic, p, qos=1)
    ok = done.wait(TIMEOUT)
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.disconnect()
        c.loop_stop()
    if not ok:
        raise SystemExit(f"raw paho: {got[0]} of {len(payloads)} messages arrived in {TIMEOUT:g} s")
    return len(payloads) / elapsed


def edgeswarm_frames(host: str, port: int, protocol: str, region: str, frames: int, batch: int) -> float:
    """Frames per second from a writer node process's first write until a reader node
    process applied the last, written `batch` frames per node.batch() (1: one put each)."""
    items = [[f"k{i % KEYS}", frame_value(i)] for i in range(frames)]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        writer, reader = (stack.enter_context(NodeProcess(Config(
            home=Path(tmp) / n, regions=[region], broker_host=host, broker_port=port, protocol=protocol,
            sync_interval=0, snapshot_interval=0))) for n in ("writer", "reader"))
        t0 = time.perf_counter()
        if batch == 1:
            writer.put_many(region, items)
        else:
            writer.put_batches(region, items, batch)
        if not reader.wait_counter("applied", frames, TIMEOUT):
            raise SystemExit(f"edgeswarm: {reader.counters()['applied']} of {frames} frames applied in {TIMEOUT:g} s")
        return frames / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=3000, help="frames (and raw messages) through each broker")
    p.add_argument("--nodes", type=int, default=20, help="swarm-sim node processes")
    p.add_argument("--seconds", type=float, default=10.0, help="swarm-sim load time")
    p.add_argument("--rate", type=float, default=2.0, help="swarm-sim writes per second per writer")
    p.add_argument("--voters", type=int, default=0, help="swarm-sim nodes that vote, the writers among them "
                   "(default 0: every node)")
    p.add_argument("--batch", type=int, default=100, help="frames per node.batch() in the batched run")
    p.add_argument("--pairs", type=int, default=3, help="raw and batched runs, in turn")
    args = p.parse_args()
    workload = Workload(nodes=args.nodes, seconds=args.seconds, rate=args.rate, voters=args.voters)
    workload.check()
    columns: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # (one broker at a time: the embedded one, in this process, would otherwise go on
        # retrying deliveries to the swarm-sim's stopped nodes while Mosquitto is measured)
        brokers = [("embedded amqtt", EmbeddedBroker, "3.1.1", mqtt.MQTTv311)]
        if find_mosquitto():
            brokers.append(("mosquitto", lambda: MosquittoProcess(Path(tmp)), "5", mqtt.MQTTv5))
        else:
            print("mosquitto is not installed: only the embedded broker is measured")
        for name, make, protocol, paho_protocol in brokers:
            with make() as broker:
                columns[name] = measure(name, broker, protocol, paho_protocol, args, workload)
    table(columns, args.frames, args.batch, workload)


def measure(name: str, broker, protocol: str, paho_protocol: int, args: argparse.Namespace,
            workload: Workload) -> dict:
    """Every figure of one broker."""
    region = f"bench/brokers/{int(time.time() * 1000)}"
    pairs = []
    for i in range(args.pairs):
        raw = raw_paho(broker.host, broker.port, paho_protocol, region_topic("diff", region + f"/r{i}"),
                       signed_diffs(region + f"/r{i}", args.frames))
        batched = edgeswarm_frames(broker.host, broker.port, protocol, region + f"/b{i}", args.frames,
                                   args.batch)
        pairs.append((batched / raw, raw, batched))
        print(f"{name}: raw paho {raw:,.0f} msg/s, edgeswarm {batched:,.0f} frames/s in batches of "
              f"{args.batch} ({batched / raw:.0%})", flush=True)
    _, raw, batched = sorted(pairs)[len(pairs) // 2]
    frames = edgeswarm_frames(broker.host, broker.port, protocol, region, args.frames, 1)
    print(f"{name}: edgeswarm {frames:,.0f} frames/s one by one", flush=True)
    figures = run(workload, [broker.url], protocol)
    print(report(workload, figures, f"{name} ({broker.url})"), flush=True)
    return {"raw": raw, "frames": frames, "batched": batched, "sim": figures, "ratios": [r for r, _, _ in pairs]}


def table(columns: dict[str, dict], frames: int, batch: int, w: Workload) -> None:
    names = list(columns)
    rows = [
        (f"raw paho QoS 1, {frames} signed diffs, msg/s (median pair)", lambda c: f"{c['raw']:,.0f}"),
        ("edgeswarm writer -> reader, frames/s", lambda c: f"{c['frames']:,.0f}"),
        ("  / raw (goal >= 50 %)", lambda c: f"{c['frames'] / c['raw'] * 100:.0f} %"),
        (f"  in batches of {batch}, frames/s", lambda c: f"{c['batched']:,.0f}"),
        ("  / raw (goal >= 50 %)", lambda c: f"{c['batched'] / c['raw'] * 100:.0f} %"),
        ("  / raw, each pair", lambda c: " / ".join(f"{r * 100:.0f}" for r in c["ratios"]) + " %"),
        (f"swarm-sim {w.nodes} nodes: convergence", lambda c: f"{c['sim']['convergence'] * 100:.1f} %"),
        ("  frames lost", lambda c: f"{c['sim']['lost']} of {c['sim']['writes']}"),
        ("  frames with a kept fork", lambda c: f"{(c['sim']['conflict_rate'] or 0) * 100:.1f} %"),
        ("  write -> consensus on writer p50 / p99 ms (writes)",
         lambda c: "{:.0f} / {:.0f} ({})".format(*c["sim"]["writer_ms"])),
        ("  each writer's p99 ms", lambda c: " / ".join(f"{p99:.0f}" for _, p99, _ in c["sim"]["by_writer_ms"])),
        ("  write -> consensus everywhere p50 / p99 ms",
         lambda c: "{:.0f} / {:.0f}".format(*c["sim"]["everywhere_ms"][:2])),
        ("  writes/s", lambda c: f"{c['sim']['offered_per_s']:.1f}"),
        ("  bytes published / delivered per frame",
         lambda c: f"{c['sim']['bytes_out_per_frame']:,.0f} / {c['sim']['bytes_in_per_frame']:,.0f}"),
        ("  node CPU per write (all nodes), ms", lambda c: f"{c['sim']['cpu_ms_per_write']:,.1f}"),
        ("  node CPU while the load ran, cores", lambda c: f"{c['sim']['load_cores']:.2f} of {c['sim']['cores']}"),
    ]
    width = max(18, *(len(cell(columns[n])) + 2 for _, cell in rows for n in names))
    labels = max(len(label) for label, _ in rows)
    print()
    print(f"{'':<{labels}}" + "".join(f"{n:>{width}}" for n in names))
    for label, cell in rows:
        print(f"{label:<{labels}}" + "".join(f"{cell(columns[n]):>{width}}" for n in names))


if __name__ == "__main__":
    main()
