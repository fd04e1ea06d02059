"""mqtts:// against a private Mosquitto with a TLS listener: the site's CA, client
certificates, and clear errors when the broker cannot be trusted or refuses the client."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.broker.mosquitto import MosquittoProcess, find_mosquitto
from edgeswarm.node import Config, Node
from edgeswarm.node.cli import build_parser, main
from edgeswarm.node.config import ConfigError
from edgeswarm.node.transport import TransportError

from helpers import watch_one

TIMEOUT = 20.0
PROMPTLY = 5.0  # seconds within which a refused TLS connection must be reported
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="no mosquitto executable (apt-get install mosquitto) "
                                     "to run a private TLS broker")


@dataclass(frozen=True)
class Pki:
    """PEM files made by a private CA for this test run."""

    ca: Path
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    misnamed_cert: Path  # for broker.example only
    misnamed_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the broker does not trust
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(organization_name="edgeswarm test site"), trustme.CA()
    files: dict[str, Path] = {"ca": d / "ca.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("misnamed", ca.issue_cert("broker.example")),
                       ("client", ca.issue_cert("node.plant.example")),
                       ("stranger", other_ca.issue_cert("node.elsewhere.example"))):
        files[f"{name}_cert"], files[f"{name}_key"] = d / f"{name}.pem", d / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(files[f"{name}_cert"])
        cert.private_key_pem.write_to_path(files[f"{name}_key"])
    return Pki(**files)


class Mosquitto(MosquittoProcess):
    """A private Mosquitto with one TLS listener on a free port of 127.0.0.1."""

    def __init__(self, pki: Pki, directory: Path, *, server: str = "server", require_certificate: bool = False):
        super().__init__(directory, listener=[
            f"cafile {pki.ca}",
            f"certfile {getattr(pki, f'{server}_cert')}",
            f"keyfile {getattr(pki, f'{server}_key')}",
            f"require_certificate {'true' if require_certificate else 'false'}"], start_timeout=TIMEOUT)
        self.start()
        try:
            self._handshake(pki)
        except BaseException:
            self.stop()
            raise

    def _handshake(self, pki: Pki) -> None:
        """A real TLS handshake succeeds."""
        ctx = ssl.create_default_context(cafile=pki.ca)
        ctx.check_hostname = False  # (the misnamed certificate is the point of one test)
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version()


@pytest.fixture
def mosquitto(pki, tmp_path) -> Iterator[Callable[..., Mosquitto]]:
    """mosquitto(server="server"|"misnamed", require_certificate=False) -> a running broker."""
    brokers: list[Mosquitto] = []

    def start(**options) -> Mosquitto:
        brokers.append(Mosquitto(pki, tmp_path, **options))
        return brokers[-1]

    yield start
    for b in brokers:
        b.stop()


@pytest.fixture
def nodes(tmp_path, region) -> Iterator[Callable[..., Node]]:
    """nodes(broker, name, **config) -> a Node on the broker, not started; stopped afterwards."""
    made: list[Node] = []

    def make(broker: Mosquitto, name: str, **config) -> Node:
        node = Node(Config(home=tmp_path / name, regions=[region], broker_urls=[broker.url],
                           sync_interval=0, snapshot_interval=0, **config))
        made.append(node)
        return node

    yield make
    for node in made:
        try:
            node.stop()
        except Exception:  # stopped, or never connected, already
            pass


def refused(node: Node) -> str:
    """Start the node, expecting a prompt TransportError; its message."""
    t0 = time.monotonic()
    with pytest.raises(TransportError) as e:
        node.start()
    assert time.monotonic() - t0 < PROMPTLY, f"the refusal took {time.monotonic() - t0:.1f} s: {e.value}"
    return str(e.value)


# -- a real TLS broker ---------------------------------------------------------------------------

@needs_mosquitto
def test_nodes_share_writes_over_tls_with_the_site_ca(mosquitto, nodes, pki, region):
    broker = mosquitto()
    a = nodes(broker, "a", ca_file=str(pki.ca)).start()
    b = nodes(broker, "b", ca_file=str(pki.ca)).start()
    assert a.transport.connected and a.transport.port == broker.port
    version = a.put(region, "conveyor", {"speed": 1.2})
    assert b.wait_until(lambda: b.store.has_version(bytes.fromhex(version)), TIMEOUT), b.stats()
    assert b.head(region, "conveyor").value == {"speed": 1.2}


@needs_mosquitto
def test_system_cas_do_not_trust_a_site_ca(mosquitto, nodes):
    broker = mosquitto()
    message = refused(nodes(broker, "a"))
    assert f"broker 127.0.0.1:{broker.port}" in message
    assert "certificate verify failed" in message and "system certificate authorities" in message


@needs_mosquitto
def test_a_broker_certificate_for_another_name_is_refused(mosquitto, nodes, pki):
    broker = mosquitto(server="misnamed")
    message = refused(nodes(broker, "a", ca_file=str(pki.ca)))
    assert f"broker 127.0.0.1:{broker.port}" in message
    assert "certificate verify failed" in message and "mismatch" in message


@needs_mosquitto
def test_a_broker_that_requires_client_certificates(mosquitto, nodes, pki, region):
    broker = mosquitto(require_certificate=True)
    client = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    a, b = nodes(broker, "a", **client).start(), nodes(broker, "b", **client).start()
    version = a.put(region, "k", {"i": 1})
    assert b.wait_until(lambda: b.store.has_version(bytes.fromhex(version)), TIMEOUT), b.stats()

    message = refused(nodes(broker, "anonymous", ca_file=str(pki.ca)))
    assert f"broker 127.0.0.1:{broker.port} closed the TLS connection" in message
    assert "no client certificate given" in message

    stranger = {"ca_file": str(pki.ca), "cert_file": str(pki.stranger_cert), "key_file": str(pki.stranger_key)}
    message = refused(nodes(broker, "stranger", **stranger))
    assert f"broker 127.0.0.1:{broker.port} closed the TLS connection" in message
    assert "did it refuse the client certificate?" in message


@needs_mosquitto
def test_watch_uses_the_tls_options(mosquitto, nodes, pki, region, tmp_path):
    broker = mosquitto()
    env = {**os.environ, "EDGESWARM_HOME": str(tmp_path / "no-node-here")}
    watch_cmd = [sys.executable, "-m", "edgeswarm.node.cli", "watch", region, "--broker", broker.url]
    untrusting = subprocess.run(watch_cmd + ["--count", "1"], capture_output=True, text=True, env=env,
                                timeout=TIMEOUT)
    assert untrusting.returncode == 1 and "certificate verify failed" in untrusting.stderr, untrusting.stderr

    def write():
        writer = nodes(broker, "writer", ca_file=str(pki.ca)).start()
        writer.put(region, "k", {"seen": True})
        return writer

    out, writer = watch_one(watch_cmd[3:] + ["--ca-file", str(pki.ca)], write, TIMEOUT, env=env)
    assert f'"region": "{region}"' in out and f'"sender": "{writer.node_id}"' in out


# -- configuration -----------------------------------------------------------------------------

def test_tls_settings_are_checked(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    tls_url = ["mqtts://broker.example"]
    with pytest.raises(ConfigError, match=r"broker\.ca_file: no file .*missing\.pem"):
        Config(home=tmp_path, broker_urls=tls_url, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"broker\.ca_file: .*relative, so taken from the node's home"):
        Config(home=tmp_path / "home", broker_urls=tls_url, ca_file="ca.pem")
    with pytest.raises(ConfigError, match=r"broker\.cert_file and broker\.key_file go together"):
        Config(home=tmp_path, broker_urls=tls_url, cert_file=str(pem))
    with pytest.raises(ConfigError, match=r"broker\.cert_file and broker\.key_file go together"):
        Config(home=tmp_path, broker_urls=tls_url, key_file=str(pem))
    with pytest.raises(ConfigError, match=r"broker\.key_file: no file"):
        Config(home=tmp_path, broker_urls=tls_url, cert_file=str(pem), key_file="node.key")
    with pytest.raises(ConfigError, match=r"broker\.ca_file given, but .* mqtts:// brokers only"):
        Config(home=tmp_path, broker_urls=["mqtt://broker.example"], ca_file=str(pem))
    with pytest.raises(ConfigError, match=r"mqtts:// brokers only"):
        Config(home=tmp_path, ca_file=str(pem))  # host and port: plain MQTT
    with pytest.raises(ConfigError, match=r"broker\.ca_file must be a file path"):
        Config(home=tmp_path, broker_urls=tls_url, ca_file=1)  # type: ignore[arg-type]


def test_tls_settings_in_config_toml_are_relative_to_the_home(tmp_path):
    home = tmp_path / "home"
    (home / "tls").mkdir(parents=True)
    for name in ("ca.pem", "node.pem", "node.key"):
        (home / "tls" / name).write_text("PEM\n")
    config = Config(home=home, broker_urls=["mqtts://broker.example"], ca_file="tls/ca.pem",
                    cert_file="tls/node.pem", key_file="tls/node.key")
    assert config.tls.ca_file == str(home / "tls" / "ca.pem")
    assert config.tls.key_file == str(home / "tls" / "node.key")
    config.save()
    loaded = Config.load(home)
    assert (loaded.ca_file, loaded.cert_file, loaded.key_file) == ("tls/ca.pem", "tls/node.pem", "tls/node.key")
    assert loaded.tls == config.tls
    assert Config(home=home).tls.ca_file is None  # none given: the system's CAs

    text = config.config_path.read_text().replace('"tls/ca.pem"', "7")
    config.config_path.write_text(text)
    with pytest.raises(ConfigError, match=r"broker\.ca_file must be a file path"):
        Config.load(home)


def test_cli_tls_options(tmp_path, monkeypatch, capsys):
    parser = build_parser()
    for command in (["init"], ["run"], ["put", "r", "k", "{}"], ["watch", "r"]):
        args = parser.parse_args(command + ["--ca-file", "a", "--cert-file", "b", "--key-file", "c"])
        assert (args.ca_file, args.cert_file, args.key_file) == ("a", "b", "c")
    (tmp_path / "ca.pem").write_text("PEM\n")
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    assert main(["--home", str(home), "init", "--broker", "mqtts://127.0.0.1:8883", "--ca-file", "ca.pem"]) == 0
    assert Config.load(home).ca_file == str(tmp_path / "ca.pem")  # from the current directory, kept absolute
    assert main(["--home", str(tmp_path / "other"), "init", "--ca-file", "ca.pem"]) == 1
    assert "mqtts:// brokers only" in capsys.readouterr().err


def test_the_embedded_broker_listens_over_tls(nodes, pki, region):
    with EmbeddedBroker(tls=(str(pki.server_cert), str(pki.server_key))) as broker:
        assert broker.url.startswith("mqtts://")
        a = nodes(broker, "a", ca_file=str(pki.ca), protocol="3.1.1").start()
        b = nodes(broker, "b", ca_file=str(pki.ca), protocol="3.1.1").start()
        version = a.put(region, "conveyor", {"speed": 0.8})
        assert b.wait_until(lambda: b.store.has_version(bytes.fromhex(version)), TIMEOUT), b.stats()
        with pytest.raises(TransportError, match="certificate verify failed"):
            nodes(broker, "untrusting", protocol="3.1.1").start()  # the system's CAs do not know the site CA
