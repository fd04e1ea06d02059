"""A board's bundle, end to end: made by `edgeswarm provision`, installed by its install.sh
from its wheelhouse alone (no package index), its systemd unit accepted by
systemd-analyze, and the installed node started from the bundle's configuration: it tells
systemd it is ready, pings the watchdog, and its writes reach a peer of the swarm."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config, Node
from edgeswarm.node.cli import main
from edgeswarm.node.provision import PLATFORMS, PREFIX, STATE, check_unit
from edgeswarm.shared.identity import Identity

from helpers import certificate

TIMEOUT = 60.0


def _index_reachable() -> bool:
    with tempfile.TemporaryDirectory() as d:
        return subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", d,
                               f"paho-mqtt=={metadata.version('paho-mqtt')}"], capture_output=True).returncode == 0


def _offline_env(**extra: str) -> dict[str, str]:
    """The environment without any pip setting, pip reading no configuration file and
    allowed no index: what the bundle installs must come from its wheelhouse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", **extra}


class NotifySocket:
    """The socket systemd listens on for a Type=notify service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(TIMEOUT)

    def next(self) -> str:
        return self.sock.recv(4096).decode()

    def wait_for(self, state: str) -> list[str]:
        seen = []
        while state not in seen:
            seen.extend(self.next().split("\n"))
        return seen


def test_bundle_installs_offline_and_its_node_joins_the_swarm(tmp_path, admin, admin_dir, region):
    if not _index_reachable():
        pytest.skip("no package index reachable to fill the bundle's wheelhouse from")
    bundle = tmp_path / "bundle"
    with EmbeddedBroker(admin=admin.public_key.hex()) as broker:
        assert main(["provision", "--out", str(bundle), "--region", region, "--broker", broker.url,
                     "--admin-dir", str(admin_dir)]) == 0
        assert (bundle / "home" / "node.key").stat().st_mode & 0o077 == 0
        assert bundle.stat().st_mode & 0o077 == 0
        wheels = {p.name.split("-")[0].lower() for p in (bundle / "wheelhouse").glob("*.whl")}
        assert {"edgeswarm", "paho_mqtt", "cbor2", "pynacl", "apscheduler", "sqlite_utils", "amqtt", "pip"} <= wheels

        prefix, state = tmp_path / "opt", tmp_path / "state"
        install = subprocess.run(["sh", str(bundle / "install.sh")], capture_output=True, text=True, timeout=300,
                                 env=_offline_env(EDGESWARM_PREFIX=str(prefix), EDGESWARM_STATE=str(state),
                                                  EDGESWARM_SYSTEM="no"))
        assert install.returncode == 0, install.stderr
        assert (prefix / "bin" / "edgeswarm").exists() and (state / "node.key").exists()
        assert (state / "node.key").stat().st_mode & 0o077 == 0

        # The bundle's unit, with the paths of this install, as systemd would load it.
        unit = tmp_path / "edgeswarm.service"
        unit.write_text((bundle / "edgeswarm.service").read_text().replace(PREFIX, str(prefix))
                        .replace(STATE, str(state)))
        assert check_unit(unit) is None, check_unit(unit)

        peer_identity = Identity.generate()
        peer_home = tmp_path / "peer"
        peer_identity.save(peer_home / "node.key")
        (peer_home / "admission.cert").write_bytes(certificate(admin, peer_identity, [region]))
        peer = Node(Config(home=peer_home, regions=[region], broker_port=broker.port, protocol="3.1.1",
                           sync_interval=0, snapshot_interval=0, swarm_admin=admin.public_key.hex(),
                           certificate="admission.cert")).start()
        notify = NotifySocket(tmp_path / "notify")
        edgeswarm = str(prefix / "bin" / "edgeswarm")
        node = subprocess.Popen([edgeswarm, "--home", str(state), "run"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=_offline_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000"))
        try:
            assert "READY=1" in notify.wait_for("READY=1")
            assert "WATCHDOG=1" in notify.wait_for("WATCHDOG=1")
            put = subprocess.run([edgeswarm, "--home", str(state), "put", region, "pump", '{"rpm": 1200}'],
                                 capture_output=True, text=True, timeout=TIMEOUT, env=_offline_env())
            assert put.returncode == 0, put.stderr
            assert peer.wait_until(lambda: peer.get(region, "pump") == {"rpm": 1200}, TIMEOUT), peer.stats()
            node.terminate()
            assert node.wait(TIMEOUT) == 0, node.stderr.read()
            assert "STOPPING=1" in notify.wait_for("STOPPING=1")
        finally:
            if node.poll() is None:
                node.kill()
            peer.stop()
            notify.sock.close()


def test_a_raspberry_pi_bundle_resolves_offline_for_its_platform(tmp_path, admin_dir):
    """A 64-bit Raspberry Pi's wheelhouse, checked from here: pip resolves edgeswarm and
    every dependency from it alone, for aarch64 and the board's Python."""
    if not _index_reachable():
        pytest.skip("no package index reachable to fill the bundle's wheelhouse from")
    bundle = tmp_path / "pi"
    assert main(["provision", "--out", str(bundle), "--region", "plant", "--broker", "mqtt://10.0.0.2:1883",
                 "--auto-broker", "--platform", "aarch64", "--python", "3.11", "--admin-dir", str(admin_dir)]) == 0
    wheelhouse = bundle / "wheelhouse"
    assert any(p.name.startswith("cbor2-") and p.name.endswith("_aarch64.whl") for p in wheelhouse.iterdir())
    assert not any("x86_64" in p.name for p in wheelhouse.iterdir())
    report = tmp_path / "report.json"
    tags = [a for tag in PLATFORMS["aarch64"] for a in ("--platform", tag)]
    resolve = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                              "--no-index", "--find-links", str(wheelhouse), "--only-binary=:all:",
                              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                              "--abi", "none", *tags, "--target", str(tmp_path / "target"), "edgeswarm"],
                             capture_output=True, text=True, env=_offline_env())
    assert resolve.returncode == 0, resolve.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"edgeswarm", "paho-mqtt", "cbor2", "pynacl", "apscheduler", "sqlite-utils", "amqtt"} <= names


def test_first_boot_scripts_parse(tmp_path, admin_dir):
    bundle = tmp_path / "b"
    assert main(["provision", "--out", str(bundle), "--region", "plant", "--broker", "mqtt://10.0.0.2:1883",
                 "--admin-dir", str(admin_dir), "--no-wheelhouse"]) == 0
    for script in ("install.sh", "firstrun.sh"):
        check = subprocess.run(["sh", "-n", str(bundle / script)], capture_output=True, text=True)
        assert check.returncode == 0, (script, check.stderr)
    user_data = (bundle / "user-data").read_text()
    assert user_data.startswith("#cloud-config\n")
    assert "install.sh" in " ".join(yaml.safe_load(user_data)["runcmd"][0])
    problems = check_unit(bundle / "edgeswarm.service")
    if problems is not None:  # /opt/edgeswarm is not installed here: that is all it may say
        assert all(f"{PREFIX}/bin/edgeswarm is not executable" in line for line in problems.splitlines()), problems


def test_the_watchdog_stops_when_the_inbox_worker_is_gone(tmp_path, region):
    with EmbeddedBroker() as broker:
        node = Node(Config(home=tmp_path / "n", regions=[region], broker_port=broker.port, protocol="3.1.1",
                           sync_interval=0, snapshot_interval=0))
        assert node.trouble() is not None  # not started
        node.start()
        try:
            assert node.trouble() is None
        finally:
            node.stop()
        assert "not running" in node.trouble()


def test_provision_refuses_what_it_cannot_make(tmp_path, admin_dir, capsys):
    existing = tmp_path / "there"
    existing.mkdir()
    assert main(["provision", "--out", str(existing), "--region", "plant", "--broker", "mqtt://h:1883",
                 "--admin-dir", str(admin_dir), "--no-wheelhouse"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["provision", "--out", str(tmp_path / "b"), "--region", "plant", "--broker", "http://h",
                 "--admin-dir", str(admin_dir), "--no-wheelhouse"]) == 1
    assert "mqtt://host:port" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["provision", "--out", str(tmp_path / "c"), "--region", "plant", "--broker", "mqtt://h:1883",
                 "--admin-dir", str(tmp_path / "nobody"), "--no-wheelhouse"]) == 1
    assert "no swarm admin key" in capsys.readouterr().err


def test_a_long_start_step_asks_systemd_for_more_time_until_it_ends(tmp_path, monkeypatch):
    """Opening a store migrated to a new schema may outlast TimeoutStartSec: while it
    runs, the node extends the start timeout; once it ends, no more."""
    import time

    from edgeswarm.node import systemd

    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    try:
        with systemd.more_time(step=0.3):
            time.sleep(0.5)  # (the long step)
        asked: list[str] = []
        notify.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):  # all it sent, and then nothing once the step is over
            while True:
                asked.append(notify.next())
        assert len(asked) >= 2 and set(asked) == {"EXTEND_TIMEOUT_USEC=300000"}, asked
    finally:
        notify.sock.close()
