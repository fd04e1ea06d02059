"""Mosquitto for a swarm: the settings a site's Mosquitto needs (`site_settings` writes the
password and ACL files of a swarm with a roster), and a private Mosquitto process for a node
(or a test, or a bench) on a machine that has Mosquitto installed.

The configuration it writes carries the settings edgeswarm wants from any Mosquitto:
`set_tcp_nodelay true` (without it Mosquitto holds small packets back for the client's
delayed ACK: about 40 ms more per hop, which a vote round pays twice) and a queue deep
enough for a node's persistent session to hold a burst while the node is away.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path

from edgeswarm.shared.identity import Identity
from edgeswarm.shared.roster import ADMIN_USERNAME, RosterError, admin_password, check_broker_login
from edgeswarm.shared.topics import ADDRESSED, NODE, PREFIX

from .embedded import BrokerError, free_port, is_listening

# Settings for any Mosquitto that carries a swarm (also for a site's own broker).
RECOMMENDED = ("set_tcp_nodelay true", "max_queued_messages 100000")


def password_hash(password: str, salt: bytes | None = None) -> str:
    """A password file entry as mosquitto_passwd writes it: PBKDF2-SHA512, 101 rounds."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, 101, 64)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def site_settings(directory: Path, logins: dict[str, str], admin: Identity) -> list[str]:
    """Write `passwords` and `acl` in `directory` for the nodes whose broker logins (node id ->
    password, as `edgeswarm id --broker-password` prints them) are given, and the admin's
    tools; returns the settings that use them. Each node may write in its certificate's
    region trees, on its own node topic and, on other nodes' topics, what it addresses to
    them (topics.ADDRESSED); and read those and every node topic. A login
    that is not valid for this admin key is a RosterError naming the node."""
    entries, acl = [f"{ADMIN_USERNAME}:{password_hash(admin_password(admin))}"], \
        [f"user {ADMIN_USERNAME}", f"topic readwrite {PREFIX}/#", ""]
    for node_id, password in sorted(logins.items()):
        try:
            cert = check_broker_login(node_id, password, admin.public_key, None)
        except RosterError as e:
            raise RosterError(f"node {node_id}: {e}") from None
        entries.append(f"{node_id}:{password_hash(password)}")
        acl += [f"user {node_id}", *(f"topic readwrite {PREFIX}/+/{r}/#" for r in cert.regions),
                f"topic readwrite {PREFIX}/{NODE}/{node_id}/#", f"topic read {PREFIX}/{NODE}/+/+",
                *(f"topic write {PREFIX}/{NODE}/+/{kind}" for kind in sorted(ADDRESSED)), ""]
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in (("passwords", entries), ("acl", acl)):
        path = directory / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        path.chmod(0o600)
    return ["allow_anonymous false", f"password_file {directory / 'passwords'}", f"acl_file {directory / 'acl'}"]


def find_mosquitto() -> str | None:
    """The mosquitto executable (Debian installs it in /usr/sbin, often not on PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


class MosquittoProcess:
    """`listener` lines go in the listener's section (TLS files, require_certificate...),
    `settings` after it; anonymous clients are allowed unless the settings say otherwise."""

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", port: int = 0,
                 listener: Iterable[str] = (), settings: Iterable[str] = (), start_timeout: float = 15.0,
                 config_file: Path | None = None) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port or free_port(host)
        self.listener = list(listener)
        self.settings = list(settings)
        self.start_timeout = start_timeout
        self.config_file = config_file  # a whole configuration of its own (its listener on host:port)
        self.log: list[str] = []
        self._running = threading.Event()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        tls = any(line.startswith("certfile") for line in self.listener)
        return f"{'mqtts' if tls else 'mqtt'}://{self.host}:{self.port}"

    def config(self) -> str:
        if self.config_file is not None:
            lines = [self.config_file.read_text(encoding="utf-8")]
        else:
            lines = self._lines()
        if os.geteuid() == 0:  # as root, Mosquitto would switch to the `mosquitto` user, who cannot read our files
            lines.append(f"user {getpass.getuser()}")
        return "\n".join(lines) + "\n"

    def _lines(self) -> list[str]:
        return [f"listener {self.port} {self.host}", *self.listener,
                *(["allow_anonymous true"] if not any(s.startswith("allow_anonymous") for s in self.settings) else []),
                *RECOMMENDED, "persistence false", "log_dest stderr",
                "log_type error", "log_type warning", "log_type notice", "log_type information", *self.settings]

    def start(self) -> MosquittoProcess:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError("no mosquitto executable (apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / f"mosquitto-{self.port}.conf"
        conf.write_text(self.config(), encoding="utf-8")
        self._proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_log, daemon=True).start()
        # "mosquitto version ... running" is logged once the listeners are open
        if not self._running.wait(self.start_timeout) or self._proc.poll() is not None \
                or not is_listening(self.host, self.port):
            self.stop()
            raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}: {''.join(self.log[-5:])}")
        return self

    def _read_log(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.log.append(line)
            if " running" in line:
                self._running.set()
        self._running.set()  # it exited

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.start_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
