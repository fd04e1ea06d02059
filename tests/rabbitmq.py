"""A private RabbitMQ node with its MQTT plugin, for tests.

    with RabbitMQ(tmp_path) as rabbit:
        rabbit.url   # "mqtt://127.0.0.1:PORT"

The node listens for MQTT only (no AMQP listener), on 127.0.0.1 and a port free at start,
with its own node name, Erlang distribution port, database and logs under the directory
given, and its own Erlang cookie (HOME points there), so it never touches a RabbitMQ the
machine runs. Anonymous MQTT clients are let in as the guest user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from edgeswarm.broker.embedded import free_port, is_listening

HOST = "127.0.0.1"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT = 60.0


def find_rabbitmq() -> str | None:
    """rabbitmq-server, when it is installed with its MQTT plugin (Debian's rabbitmq-server)."""
    plugins = Path("/usr/lib/rabbitmq/lib")
    if not os.access(SERVER, os.X_OK) or not any(plugins.glob("rabbitmq_server-*/plugins/rabbitmq_mqtt-*")):
        return None
    return SERVER


class RabbitMQError(Exception):
    """The node did not start, or its MQTT listener never answered."""


class RabbitMQ:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def start(self) -> RabbitMQ:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text("\n".join([
            "listeners.tcp = none",
            f"mqtt.listeners.tcp.default = {HOST}:{self.port}",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            "loopback_users = none",
            "log.console = false",
            ""]), encoding="utf-8")
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        env = {**os.environ, "HOME": str(d), "RABBITMQ_NODENAME": f"es-{uuid.uuid4().hex[:8]}@localhost",
               "RABBITMQ_NODE_IP_ADDRESS": HOST, "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
               "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
               "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid")}
        env.pop("RABBITMQ_ALLOW_INPUT", None)
        with open(d / "server.out", "ab") as out:
            self.process = subprocess.Popen([SERVER], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not is_listening(HOST, self.port, timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (d / "server.out").read_text(errors="replace")[-800:]
                raise RabbitMQError(f"RabbitMQ did not start its MQTT listener on {HOST}:{self.port}: {tail}")
            time.sleep(0.2)  # (nothing to wait on but the port: the node writes no readiness line)
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> RabbitMQ:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.directory / "mnesia", ignore_errors=True)
