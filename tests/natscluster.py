"""A private cluster of nats-server processes with MQTT listeners, for tests.

    with NatsCluster(tmp_path, servers=3) as cluster:
        url1, url2, url3 = cluster.mqtt_urls  # "mqtt://127.0.0.1:PORT", one per server
        cluster.kill(0)                       # a crash of the first server

Every server listens on 127.0.0.1 only, on ports free at start: client, route, MQTT and
monitoring. NATS speaks MQTT 3.1.1 on top of JetStream, which in a cluster needs a
`server_name`, a cluster name, routes and a quorum of its meta group (hence 3 servers).
The MQTT streams (sessions, QoS 1 messages, retained messages) are replicated on every
server, up to 3 (`stream_replicas`): with one replica, losing the server that holds a
stream stops MQTT on all the others.

Readiness: a server's MQTT port listens before JetStream has a meta leader, and an MQTT
CONNECT that comes that early holds the server's MQTT set-up for NATS's JetStream API
timeout (4 s). So each server is first asked /healthz on its monitoring port, then given a
real MQTT session (CONNACK, and a QoS 1 SUBSCRIBE granted).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeswarm.broker.embedded import free_port, is_listening

HOST = "127.0.0.1"


def find_nats_server() -> str | None:
    """The nats-server binary: on PATH, or where Debian puts it (/usr/sbin, often not on a
    user's PATH)."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/local/sbin:/usr/sbin:/sbin")


class NatsClusterError(Exception):
    """A server of the cluster did not start, or never became ready for MQTT."""


@dataclass
class NatsServer:
    name: str
    directory: Path
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats.log"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self, routes: list[int], cluster: str, stream_replicas: int) -> str:
        return "\n".join([
            f"server_name: {self.name}",
            f"listen: {HOST}:{self.client_port}",
            f"http: {HOST}:{self.http_port}",
            "jetstream {",
            f'  store_dir: "{self.directory / "jetstream"}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
            "cluster {",
            f"  name: {cluster}",
            f"  listen: {HOST}:{self.cluster_port}",
            f"  routes: [{', '.join(f'nats-route://{HOST}:{p}' for p in routes)}]",
            "}",
            "mqtt {",
            f"  listen: {HOST}:{self.mqtt_port}",
            f"  stream_replicas: {stream_replicas}",
            "}",
            "",
        ])

    def start(self, binary: str) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it has not ended within `timeout`."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, connections dropped by the kernel."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def healthy(self) -> bool:
        """JetStream is up and current with its meta leader (the monitoring /healthz)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/healthz?js-server-only=true",
                                        timeout=2.0) as answer:
                return json.load(answer).get("status") == "ok"
        except (OSError, ValueError, urllib.error.URLError):
            return False


def mqtt_ready(host: str, port: int, timeout: float = 5.0) -> str | None:
    """One real MQTT 3.1.1 session on host:port: CONNECT answered by a successful CONNACK,
    then a QoS 1 SUBSCRIBE granted (a JetStream consumer made). None when both went
    through, otherwise why not."""
    answered, subscribed = threading.Event(), threading.Event()
    outcome: dict[str, str] = {}

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            outcome["error"] = f"CONNACK {reason_code}"
        else:
            client.subscribe(f"natscluster/ready/{uuid.uuid4().hex}", qos=1)
        answered.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            outcome["error"] = f"SUBACK {reason_codes[0]}"
        subscribed.set()

    def on_disconnect(client, userdata, flags, reason_code, properties) -> None:
        outcome.setdefault("error", f"disconnected: {reason_code}")
        answered.set()
        subscribed.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"natscluster-{uuid.uuid4().hex[:12]}",
                         protocol=mqtt.MQTTv311, clean_session=True)
    client.on_connect, client.on_subscribe, client.on_disconnect = on_connect, on_subscribe, on_disconnect
    deadline = time.monotonic() + timeout
    try:
        client.connect(host, port, keepalive=10)
    except OSError as e:
        return f"cannot connect: {e}"
    client.loop_start()
    try:
        if not answered.wait(timeout):
            return "no CONNACK"
        if "error" not in outcome and not subscribed.wait(max(0.0, deadline - time.monotonic())):
            return "no SUBACK"
        return outcome.get("error")
    finally:
        client.disconnect()
        client.loop_stop()


class NatsCluster:
    """`servers` nats-server processes routed into one cluster, their configurations,
    stores and logs under `directory`."""

    def __init__(self, directory: Path, servers: int = 3, *, cluster: str = "edgeswarm",
                 stream_replicas: int | None = None, start_timeout: float = 60.0,
                 binary: str | None = None) -> None:
        if servers < 1:
            raise ValueError("a cluster has at least one server")
        found = binary or find_nats_server()
        if found is None:
            raise NatsClusterError("nats-server is not installed")
        self.binary = found
        self.directory = Path(directory)
        self.count = servers
        self.cluster = cluster
        self.stream_replicas = stream_replicas or min(servers, 3)
        self.start_timeout = start_timeout
        self.servers: list[NatsServer] = []
        self.started_in = 0.0  # seconds start() took

    @property
    def mqtt_urls(self) -> list[str]:
        return [s.mqtt_url for s in self.servers]

    @property
    def mqtt_ports(self) -> list[int]:
        return [s.mqtt_port for s in self.servers]

    def _ports(self) -> list[int]:
        taken: set[int] = set()
        while len(taken) < 4 * self.count:
            taken.add(free_port(HOST))
        return list(taken)

    def _layout(self) -> None:
        ports = self._ports()
        self.servers = []
        for i in range(self.count):
            client, route, mqtt_port, http = ports[4 * i:4 * i + 4]
            directory = self.directory / f"nats{i + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            self.servers.append(NatsServer(f"{self.cluster}-{i + 1}", directory, client, route, mqtt_port, http))
        routes = [s.cluster_port for s in self.servers]
        for s in self.servers:
            s.config_path.write_text(s.config(routes, self.cluster, self.stream_replicas), encoding="utf-8")

    def start(self) -> NatsCluster:
        """Start every server and return once each answers a real MQTT session. A server that
        exits at start (a port taken meanwhile, say) makes a new layout on new ports, twice."""
        began = time.monotonic()
        layouts = 3
        while True:
            layouts -= 1
            self._layout()
            for s in self.servers:
                s.start(self.binary)
            try:
                self._wait_ready(began + self.start_timeout)
            except NatsClusterError:
                exited = any(not s.running for s in self.servers)
                self.stop()
                if not exited or not layouts:
                    raise
            else:
                self.started_in = time.monotonic() - began
                return self

    def _wait_ready(self, deadline: float) -> None:
        """The first server's first MQTT session creates the account's MQTT streams; once it
        is ready, the others (which then only add their own consumers) are probed at once.
        (Several servers creating the streams at the same time time out, 4 s, in NATS 2.9.)"""
        problems: dict[str, str] = {}
        self._wait_server(self.servers[0], deadline, problems)
        if not problems:
            threads = [threading.Thread(target=self._wait_server, args=(s, deadline, problems), daemon=True)
                       for s in self.servers[1:]]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()) + 10.0)
        if problems:
            detail = "\n".join(f"{s.name}: {why}\n{s.log_tail()}" for s in self.servers
                               if (why := problems.get(s.name)))
            raise NatsClusterError(f"not ready for MQTT within {self.start_timeout:.0f} s:\n{detail}")

    @staticmethod
    def _wait_server(server: NatsServer, deadline: float, problems: dict[str, str]) -> None:
        why = "not probed"
        while time.monotonic() < deadline:
            if not server.running:
                problems[server.name] = f"exited ({server.process.returncode})"
                return
            if not server.healthy():
                why = "JetStream not ready (/healthz)"
            elif (why := mqtt_ready(HOST, server.mqtt_port,
                                    timeout=max(0.5, min(5.0, deadline - time.monotonic())))) is None:
                return
            time.sleep(0.1)  # between readiness probes of a server still starting
        problems[server.name] = why

    def kill(self, index: int) -> None:
        """Crash one server (SIGKILL); returns once it is gone and its MQTT port closed."""
        server = self.servers[index]
        server.kill()
        if is_listening(HOST, server.mqtt_port, timeout=0.5):
            raise NatsClusterError(f"{server.name} still listens on {server.mqtt_port} after SIGKILL")

    def stop(self) -> None:
        """Stop every server still running (all signalled first, then each waited for)."""
        for s in self.servers:
            if s.process is not None and s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
        for s in self.servers:
            s.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
