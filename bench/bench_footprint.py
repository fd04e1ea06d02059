"""Footprint of one node process with many frames on disk: start-up, memory and idle CPU.

    python bench/bench_footprint.py [--frames 10000 100000] [--idle 60] [--broker HOST:PORT] [--hosting]

For each store size N in --frames:
  - writes N frames through the Node API into a fresh store (one node, a member alone, so
    every write is also voted and reaches consensus locally): the write rate and the
    store's size on disk. The node is not connected while writing, so the signed diffs and
    votes wait in its outbox; a short-lived connection then hands them to the broker (as a
    board that has been running would have done), so the measured node starts with an
    empty outbox;
  - the import of the CLI entry in a fresh interpreter (`import edgeswarm.node.cli`,
    timed inside the interpreter, median of 3; also the interpreter's wall time, a bare
    interpreter's, and the `-X importtime` total), and whether that import loads amqtt;
  - starts the node in a fresh interpreter (`python -c CHILD`), with its default
    periodic jobs (anti-entropy every 30 s with jitter, snapshots every hour), against a
    broker outside that process: the embedded broker hosted by this bench's own process
    (MQTT 3.1.1), or --broker HOST:PORT (e.g. Mosquitto; protocol "auto"). Measured:
      start-up: spawn -> `Node.start()` returned (reported by the child on a clock shared
        by both processes, time.monotonic) and spawn -> the node's first retained
        fingerprint (es/v1/node/<id>/fingerprint) arriving at a plain paho subscriber
        this bench runs;
      memory: VmRSS from /proc/<pid>/status after start (which already ran the hello
        round: the digest tree of every frame, built then and kept in memory), after one
        more anti-entropy round (`node.sync_now()`) and after the idle window; VmHWM
        (peak) at the end;
      idle CPU: the child's user+system CPU time (/proc/<pid>/stat, in clock ticks) over an
        idle window of --idle seconds, divided by the window's wall time, in % of one core
        (and, finer, the same from the live threads' /proc/<pid>/task/*/schedstat); the
        scheduled anti-entropy rounds that fell in the window are counted by their
        fingerprints reaching the subscriber (each round publishes one).
  - with --hosting, the same node again but hosting the embedded broker in its own process
    (what `edgeswarm run` does for `embedded = true`: EmbeddedBroker(host, port), then
    Node), for memory and idle CPU.

The child is driven over stdin/stdout lines ("sync", "stop"; it answers "ready ...",
"synced ...", "stopped ..."; a hosting child first says "broker" and waits for "go" while
the subscriber connects to it), and every step waits for an event (a line, a
fingerprint), never for a fixed time, except the deliberate idle window. The table at the
end has one row per store size (and per hosting node).
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeswarm.broker.embedded import EmbeddedBroker, free_port
from edgeswarm.node import Config, Node
from edgeswarm.node.cli import setup_logging
from edgeswarm.shared.envelope import EnvelopeError, decode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import node_topic

REGION = "bench"
TIMEOUT = 600.0  # seconds any one step may take before the bench gives up
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHILD = """
import time
T0 = time.monotonic()
import json, sys
from pathlib import Path
import edgeswarm.node.cli  # what `edgeswarm run` loads, and its logging set-up
from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config, Node
T1 = time.monotonic()
edgeswarm.node.cli.setup_logging(0)

home, member, host, port, protocol, hosting = sys.argv[1:7]
config = Config(home=Path(home), regions=["bench"], broker_host=host, broker_port=int(port), protocol=protocol,
                members=[member], embedded_broker=hosting == "1")  # default sync and snapshot intervals
broker = None
if config.embedded_broker:  # as cmd_run: the broker first, in this process
    broker = EmbeddedBroker(config.broker_host, config.broker_port, admin=config.swarm_admin).start()
    print("broker", time.monotonic(), flush=True)
    sys.stdin.readline()  # "go": the bench's subscriber is on
T2 = time.monotonic()
node = Node(config)
T3 = time.monotonic()
node.start()
T4 = time.monotonic()
print("ready", T0, T1, T2, T3, T4, node.presence.session, node.node_id, flush=True)
for line in sys.stdin:
    if line.strip() == "sync":
        t = time.perf_counter()
        node.sync_now()
        print("synced", time.perf_counter() - t, flush=True)
    elif line.strip() == "stop":
        break
node.stop()
if broker is not None:
    broker.stop()
print("stopped", json.dumps(node.stats()), flush=True)
"""

IMPORT_PROBE = ("import sys, time; t = time.perf_counter(); import edgeswarm.node.cli; "
                "print(time.perf_counter() - t, int(any(m == 'amqtt' or m.startswith('amqtt.') for m in sys.modules)))")


# -- measuring a process -----------------------------------------------------------------------

def proc_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(rest.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()  # (the name may hold spaces)
    return (int(after_name[11]) + int(after_name[12])) / CLK_TCK  # fields 14 and 15: utime, stime


def proc_sched_ns(pid: int) -> int:
    """Nanoseconds on a CPU of the process's live threads (/proc/<pid>/task/*/schedstat): finer
    than the clock ticks of /proc/<pid>/stat, but blind to threads that ended."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            pass
    return total


def import_check(runs: int = 3) -> dict:
    """How long a fresh interpreter takes to import the CLI entry, and whether amqtt comes with it."""
    inside, walls, bare, amqtt = [], [], [], False
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.monotonic() - t)
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True,
                             check=True).stdout.split()
        walls.append(time.monotonic() - t)
        inside.append(float(out[0]))
        amqtt |= out[1] == "1"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import edgeswarm.node.cli"], capture_output=True,
                         text=True, check=True).stderr
    total_us = 0
    for line in err.splitlines():  # "import time: self [us] | cumulative | name", nested names indented
        parts = line.split("|")
        if len(parts) == 3 and parts[2].startswith(" edgeswarm") and not parts[2].startswith("  "):
            total_us += int(parts[1])
    return {"import": statistics.median(inside), "wall": statistics.median(walls), "bare": statistics.median(bare),
            "importtime": total_us / 1e6, "amqtt": amqtt}


class Heartbeats:
    """A plain paho subscriber to one node's retained fingerprint topic: when each
    fingerprint arrived (time.monotonic) and the session it names."""

    def __init__(self, host: str, port: int, node_id: str) -> None:
        self.topic = node_topic(node_id, "fingerprint")
        self.arrivals: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-footprint-{os.getpid()}-{node_id}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not subscribed.wait(30):
            self.close()
            raise RuntimeError(f"no subscription to {self.topic} on {host}:{port}")

    def _on_message(self, client, userdata, message) -> None:
        at = time.monotonic()
        if not message.payload:  # a cleared retained fingerprint
            return
        try:
            session = decode(message.payload, topic=message.topic).body["session"]
        except (EnvelopeError, KeyError, TypeError):
            return
        with self._cond:
            self.arrivals.append((at, session))
            self._cond.notify_all()

    def of(self, session: int) -> list[float]:
        with self._cond:
            return [at for at, s in self.arrivals if s == session]

    def wait_for(self, session: int, count: int, timeout: float = TIMEOUT) -> list[float]:
        """The arrival times of the session's fingerprints once there are `count` of them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.of(session)) >= count, timeout):
                raise RuntimeError(f"fewer than {count} fingerprints of session {session} in {timeout:.0f} s")
        return self.of(session)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Child:
    """The node process, driven over its stdin and stdout lines."""

    def __init__(self, home: Path, member: str, host: str, port: int, protocol: str, hosting: bool) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(home), member, host, str(port), protocol,
                                      "1" if hosting else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float = TIMEOUT) -> list[str]:
        """The next line, which must begin with `word`; its other fields."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"node process: no {word!r} line in {timeout:.0f} s") from None
        fields = line.split(maxsplit=1 if word == "stopped" else -1)
        if not fields or fields[0] != word:
            raise RuntimeError(f"node process: expected {word!r}, got {line.strip()!r} "
                               f"(exit status {self.proc.poll()})")
        return fields[1:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# -- the steps ---------------------------------------------------------------------------------

def write_store(home: Path, member: str, frames: int) -> tuple[float, float]:
    """Write the frames through the Node API (not connected): (seconds, store MiB on disk)."""
    node = Node(Config(home=home, regions=[REGION], members=[member], sync_interval=0, snapshot_interval=0))
    t0 = time.perf_counter()
    for i in range(frames):
        node.put(f"{REGION}/area{i % 100}", f"frame{i}", {"i": i, "reading": i * 0.25, "unit": "C"})
    wrote = time.perf_counter() - t0
    node.stop()
    return wrote, sum(f.stat().st_size for f in home.glob("store.db*")) / 2**20


def flush_outbox(home: Path, member: str, host: str, port: int, protocol: str) -> float:
    """Hand what the writes left in the outbox to the broker, over a short-lived connection
    that follows no region (so nothing comes back) and announces nothing: seconds taken."""
    node = Node(Config(home=home, regions=[], members=[member], broker_host=host, broker_port=port, protocol=protocol,
                       sync_interval=0, snapshot_interval=0), client_tag="flush")
    t0 = time.perf_counter()
    try:
        node.start()
        if not node.wait_published(TIMEOUT):
            raise RuntimeError(f"the broker did not acknowledge the outbox in {TIMEOUT:.0f} s")
    finally:
        node.stop()
    return time.perf_counter() - t0


def measure(home: Path, member: str, host: str, port: int, protocol: str, idle: float, hosting: bool) -> dict:
    """Start the node in a fresh process and measure it (see the module's docstring)."""
    beats = None
    if hosting:
        port = free_port(host)
        child = Child(home, member, host, port, protocol="3.1.1", hosting=True)
    else:
        beats = Heartbeats(host, port, member)  # subscribed before the node exists
        child = Child(home, member, host, port, protocol, hosting=False)
    try:
        if hosting:
            broker_up = float(child.expect("broker")[0])
            beats = Heartbeats(host, port, member)
            child.send("go")
        t0, t1, t2, t3, t4, session, node_id = child.expect("ready")
        t0, t1, t2, t3, t4, session = float(t0), float(t1), float(t2), float(t3), float(t4), int(session)
        assert node_id == member, (node_id, member)
        first = beats.wait_for(session, 1)[0]
        fig = {"interpreter": t0 - child.spawned, "imports": t1 - t0, "node_init": t3 - t2, "node_start": t4 - t3}
        if hosting:
            fig |= {"broker_start": broker_up - t1, "to_start": None, "to_beat": None}
        else:
            fig |= {"to_start": t4 - child.spawned, "to_beat": first - child.spawned}
        fig["cpu_start"] = proc_cpu(child.pid)
        fig["rss_start"], _ = proc_memory(child.pid)

        before = len(beats.wait_for(session, 1))
        child.send("sync")
        fig["sync_s"] = float(child.expect("synced")[0])
        beats.wait_for(session, before + 1)  # the round's fingerprint is out: the round is over
        fig["rss_sync"], _ = proc_memory(child.pid)

        cpu0, ns0, w0 = proc_cpu(child.pid), proc_sched_ns(child.pid), time.monotonic()
        time.sleep(idle)  # the idle window: the node alone, with its scheduled jobs
        cpu1, ns1, w1 = proc_cpu(child.pid), proc_sched_ns(child.pid), time.monotonic()
        fig["rss_idle"], fig["hwm"] = proc_memory(child.pid)
        fig["idle_cpu"] = 100 * (cpu1 - cpu0) / (w1 - w0)
        fig["idle_cpu_s"], fig["idle_wall"] = cpu1 - cpu0, w1 - w0
        fig["idle_sched"] = 100 * (ns1 - ns0) / 1e9 / (w1 - w0)
        fig["rounds"] = sum(w0 <= at <= w1 for at in beats.of(session))

        child.send("stop")
        child.expect("stopped")
        child.proc.wait(TIMEOUT)
        return fig
    finally:
        child.kill()
        if beats is not None:
            beats.close()


# -- report ------------------------------------------------------------------------------------

def row(label: str, frames: int, size: float, rate: float, imp: dict | None, fig: dict) -> list[str]:
    def s(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)
    return [label, f"{frames:,}", f"{size:.1f}", f"{rate:,.0f}", s(imp and imp["import"]), s(fig["to_start"]),
            s(fig["to_beat"]), f"{fig['rss_start']:.1f}", f"{fig['rss_sync']:.1f}", f"{fig['rss_idle']:.1f}",
            f"{fig['hwm']:.1f}", f"{fig['idle_cpu']:.2f}", f"{fig['idle_sched']:.3f}", str(fig["rounds"])]


HEADER = ["process", "frames", "store MiB", "writes/s", "import s", "->start s", "->beat s", "RSS start",
          "RSS sync", "RSS idle", "HWM MiB", "idle CPU %", "(schedstat)", "rounds"]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[10_000, 100_000], help="store sizes to measure")
    p.add_argument("--idle", type=float, default=60.0, help="seconds of the idle window")
    p.add_argument("--broker", metavar="HOST:PORT", help="a broker to use instead of the embedded one hosted by "
                   "this bench (protocol auto)")
    p.add_argument("--hosting", action="store_true", help="also measure the node hosting the embedded broker itself")
    args = p.parse_args()
    setup_logging(0)  # as `edgeswarm run`: warnings, the embedded broker's own log off

    broker = None
    if args.broker:
        host, _, port_text = args.broker.rpartition(":")
        host, port, protocol, where = host or "127.0.0.1", int(port_text), "auto", f"broker {args.broker}"
    else:
        broker = EmbeddedBroker().start()
        host, port, protocol = broker.host, broker.port, "3.1.1"
        where = f"embedded broker in the bench process ({broker.url})"
    print(f"{sys.executable}, {os.cpu_count()} CPUs; {where}; idle window {args.idle:g} s", flush=True)
    rows = []
    try:
        for frames in args.frames:
            with tempfile.TemporaryDirectory() as tmp:
                home = Path(tmp) / "node"
                member = Identity.load_or_create(home / "node.key").node_id
                print(f"\n== {frames:,} frames (node {member})", flush=True)
                wrote, size = write_store(home, member, frames)
                rate = frames / wrote
                print(f"{frames} frames written in {wrote:.1f} s ({rate:,.0f}/s, with trace and vote); "
                      f"store {size:.1f} MiB on disk", flush=True)
                flushed = flush_outbox(home, member, host, port, protocol)
                print(f"outbox handed to the broker in {flushed:.1f} s", flush=True)
                imp = import_check()
                print(f"import edgeswarm.node.cli: {imp['import']:.3f} s in a fresh interpreter (median of 3; "
                      f"-X importtime total {imp['importtime']:.3f} s); interpreter wall {imp['wall']:.3f} s "
                      f"(bare interpreter {imp['bare']:.3f} s); amqtt imported: {'yes' if imp['amqtt'] else 'no'}",
                      flush=True)
                fig = measure(home, member, host, port, protocol, args.idle, hosting=False)
                print(f"node process: spawn -> Node.start() returned {fig['to_start']:.2f} s (interpreter "
                      f"{fig['interpreter']:.2f}, imports {fig['imports']:.2f}, Node() {fig['node_init']:.2f}, "
                      f"start() {fig['node_start']:.2f}); spawn -> first fingerprint at the subscriber "
                      f"{fig['to_beat']:.2f} s; CPU {fig['cpu_start']:.2f} s so far", flush=True)
                print(f"node process: RSS {fig['rss_start']:.1f} MiB after start, {fig['rss_sync']:.1f} MiB after a "
                      f"digest round over all frames ({fig['sync_s']:.2f} s), {fig['rss_idle']:.1f} MiB after "
                      f"{fig['idle_wall']:.0f} s idle; peak (VmHWM) {fig['hwm']:.1f} MiB", flush=True)
                print(f"node process idle: {fig['idle_cpu_s']:.2f} s CPU (user+sys, 1/{CLK_TCK} s ticks) in "
                      f"{fig['idle_wall']:.1f} s = {fig['idle_cpu']:.2f} % of a core ({fig['idle_sched']:.3f} % by "
                      f"the threads' schedstat), {fig['rounds']} scheduled anti-entropy round(s) in the window",
                      flush=True)
                rows.append(row("node", frames, size, rate, imp, fig))
                if args.hosting:
                    fig = measure(home, member, "127.0.0.1", 0, "3.1.1", args.idle, hosting=True)
                    print(f"node hosting the broker: broker start {fig['broker_start']:.2f} s, Node() + start() "
                          f"{fig['node_init'] + fig['node_start']:.2f} s; RSS {fig['rss_start']:.1f} / "
                          f"{fig['rss_sync']:.1f} / {fig['rss_idle']:.1f} MiB (start / after sync / after idle), "
                          f"peak {fig['hwm']:.1f} MiB; idle {fig['idle_cpu']:.2f} % of a core ({fig['idle_sched']:.3f} % "
                          f"by schedstat), {fig['rounds']} "
                          f"round(s) in the window", flush=True)
                    rows.append(row("node+broker", frames, size, rate, None, fig))
    finally:
        if broker is not None:
            broker.stop()
    print(f"\nOne node process ({where}; idle window {args.idle:g} s; RSS and HWM in MiB; CPU in % of one core)")
    print(table(rows))


if __name__ == "__main__":
    main()
