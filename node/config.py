"""A node's configuration: `<home>/config.toml`, written by `edgeswarm init`.

    [node]
    regions = ["plant/line1"]          # region trees this node follows
    members = ["3xiocnjkbn7puzss", ...] # node ids whose votes and writes count; empty: every
                                       # node seen (open swarm: no protection against rogues)
    quorum = 0                         # votes that make consensus; 0: a majority of members
    sync_interval = 30                 # seconds between anti-entropy digests; 0: never
    snapshot_interval = 3600           # seconds between snapshots in <home>/recovery; 0: never
    snapshots_kept = 5
    max_message_bytes = 262144         # larger messages are rejected unread
    max_clock_skew = 300               # seconds a message's clock may be ahead of this node's;
                                       # later ones are rejected (0: no limit)
    trace_kept = 10000                 # entries kept of each node's trace (this node's and the
                                       # copies of peers'); older ones are dropped (0: keep all)
    batch = true                       # changes and votes made together leave as one message per
                                       # region under one signature; false for a swarm that still
                                       # has nodes older than 0.2, which read only single messages
    relay_votes = true                 # votes go to the version's author, which passes them on to
                                       # the region together once it has a quorum; false for a
                                       # swarm that still has nodes older than 0.3
    votes_in_diffs = true              # a write's diff is also its author's vote (a round in its
                                       # body) and no vote of its own follows; false for a swarm
                                       # that still has nodes older than 0.5

    [broker]
    host = "127.0.0.1"
    port = 1883
    urls = []                          # instead of host/port: brokers in order of preference,
                                       # "mqtt://host:port" or all "mqtts://host:port" (TLS);
                                       # the node moves to the next when one is unreachable
    ca_file = ""                       # mqtts:// only: PEM file of the CA(s) to trust;
                                       # empty: the system's certificate authorities
    cert_file = ""                     # mqtts:// only: client certificate (PEM) and its key,
    key_file = ""                      # both or neither; relative paths are from the home
    protocol = "auto"                  # "auto" (MQTT 5, else 3.1.1), "5" or "3.1.1"
    embedded = false                   # host an embedded broker on host:port
    auto = false                       # when no broker above answers, the swarm elects one of
                                       # its nodes to host the bus (node/handover.py); 3.1.1
    auto_port = 1883                   # where this node's broker listens if it is elected
    auto_address = ""                  # the address peers reach it at; empty: the address this
                                       # node reaches its broker from (and it listens on all)

    [swarm]                            # a swarm with a roster (shared/roster.py); empty: open
    admin = ""                         # the swarm admin's public key, 64 hex digits
    certificate = "admission.cert"     # this node's admission certificate (from the home)
    sealed = { "plant/secret" = "plant-secret.key" }   # region trees whose diffs and votes
                                       # travel encrypted, with their shared key files

    [[rules]]                          # coherence rules, see node/coherence.py
    region = "plant/line1"
    required = ["speed"]
    types = { speed = "number" }

The home directory (default ~/.edgeswarm, or $EDGESWARM_HOME) also holds `node.key`
(the Ed25519 seed, mode 0600) and `store.db`.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from edgeswarm.shared.envelope import DEFAULT_MAX_BYTES
from edgeswarm.shared.topics import TopicError, validate_region

from edgeswarm.shared.roster import RosterError, parse_admin_key

from .coherence import Rule
from .transport import TlsSettings

TLS_KEYS = ("ca_file", "cert_file", "key_file")
CONFIG_FILE = "config.toml"
KEY_FILE = "node.key"
STORE_FILE = "store.db"


class ConfigError(Exception):
    """A configuration file that is missing, unreadable or wrong."""


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """mqtt://host[:port] (default 1883) or mqtts://host[:port] (TLS, default 8883)."""
    bad = ConfigError(f"a broker is mqtt://host:port or mqtts://host:port, not {url!r}")
    if not isinstance(url, str):
        raise bad
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise bad
    if port == 0:
        raise bad
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def _strings(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of texts")
    return value


def default_home() -> Path:
    return Path(os.environ.get("EDGESWARM_HOME") or Path.home() / ".edgeswarm")


@dataclass
class Config:
    home: Path
    regions: list[str] = field(default_factory=list)
    max_message_bytes: int = DEFAULT_MAX_BYTES
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    protocol: str = "auto"
    embedded_broker: bool = False
    broker_urls: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    quorum: int = 0
    rules: list[Rule] = field(default_factory=list)
    sync_interval: float = 30.0
    snapshot_interval: float = 3600.0
    snapshots_kept: int = 5
    max_clock_skew: float = 300.0
    trace_kept: int = 10000
    batch: bool = True
    relay_votes: bool = True
    votes_in_diffs: bool = True
    swarm_admin: str = ""
    certificate: str = ""
    sealed: dict[str, str] = field(default_factory=dict)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    broker_auto: bool = False
    auto_port: int = 1883
    auto_address: str = ""

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.validate()

    def validate(self) -> None:
        """ConfigError unless every setting is usable (run again after changing any)."""
        if not isinstance(self.members, list) or not all(isinstance(m, str) and m for m in self.members):
            raise ConfigError("node.members must be a list of node ids")
        if not isinstance(self.quorum, int) or isinstance(self.quorum, bool) or self.quorum < 0:
            raise ConfigError("node.quorum must be 0 (a majority of members) or a positive number of votes")
        if not isinstance(self.sync_interval, (int, float)) or isinstance(self.sync_interval, bool) \
                or self.sync_interval < 0:
            raise ConfigError("node.sync_interval is a number of seconds (0 turns anti-entropy off)")
        if not isinstance(self.snapshot_interval, (int, float)) or isinstance(self.snapshot_interval, bool) \
                or self.snapshot_interval < 0:
            raise ConfigError("node.snapshot_interval is a number of seconds (0 turns snapshots off)")
        if not isinstance(self.snapshots_kept, int) or isinstance(self.snapshots_kept, bool) or self.snapshots_kept < 1:
            raise ConfigError("node.snapshots_kept is a positive number")
        if not isinstance(self.max_clock_skew, (int, float)) or isinstance(self.max_clock_skew, bool) \
                or self.max_clock_skew < 0:
            raise ConfigError("node.max_clock_skew is a number of seconds (0: no limit)")
        if not isinstance(self.trace_kept, int) or isinstance(self.trace_kept, bool) or self.trace_kept < 0 \
                or 0 < self.trace_kept < 100:
            raise ConfigError("node.trace_kept is a number of trace entries, at least 100 (0: keep them all)")
        if not isinstance(self.batch, bool):
            raise ConfigError("node.batch must be true or false")
        if not isinstance(self.relay_votes, bool):
            raise ConfigError("node.relay_votes must be true or false")
        if not isinstance(self.votes_in_diffs, bool):
            raise ConfigError("node.votes_in_diffs must be true or false")
        if self.members and self.quorum > len(self.members):
            raise ConfigError(f"node.quorum {self.quorum} is more than the {len(self.members)} members")
        for r in self.regions:
            try:
                validate_region(r)
            except TopicError as e:
                raise ConfigError(f"node.regions: {e}") from None
        if not isinstance(self.max_message_bytes, int) or not 1024 <= self.max_message_bytes <= 64 * 2**20:
            raise ConfigError("node.max_message_bytes must be an integer between 1024 and 67108864")
        if not isinstance(self.broker_port, int) or not 0 < self.broker_port < 65536:
            raise ConfigError(f"broker.port must be a TCP port number, not {self.broker_port!r}")
        endpoints = self.endpoints  # (checks the URLs)
        if len({tls for _, _, tls in endpoints}) > 1:
            raise ConfigError("broker.urls are all mqtt:// or all mqtts://, not a mix")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"broker.protocol must be auto, 5 or 3.1.1, not {self.protocol!r}")
        self._check_auto(any(tls for _, _, tls in endpoints))
        self._check_tls(any(tls for _, _, tls in endpoints))
        if not isinstance(self.swarm_admin, str) or not isinstance(self.certificate, str):
            raise ConfigError("swarm.admin and swarm.certificate are texts")
        if self.swarm_admin:
            try:
                parse_admin_key(self.swarm_admin)
            except RosterError as e:
                raise ConfigError(f"swarm.admin: {e}") from None
        elif self.certificate:
            raise ConfigError("swarm.certificate given without swarm.admin, the key that signed it")
        if not isinstance(self.sealed, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                         for k, v in self.sealed.items()):
            raise ConfigError("swarm.sealed maps region trees to key files")
        for root in self.sealed:
            try:
                validate_region(root)
            except TopicError as e:
                raise ConfigError(f"swarm.sealed: {e}") from None

    def _check_auto(self, tls: bool) -> None:
        if not isinstance(self.broker_auto, bool):
            raise ConfigError("broker.auto must be true or false")
        if not isinstance(self.auto_port, int) or isinstance(self.auto_port, bool) or not 0 < self.auto_port < 65536:
            raise ConfigError(f"broker.auto_port must be a TCP port number, not {self.auto_port!r}")
        if not isinstance(self.auto_address, str) or any(c in self.auto_address for c in "/ []@"):
            raise ConfigError(f"broker.auto_address must be a host name or IPv4 address, not {self.auto_address!r}")
        if self.broker_auto:
            if tls:
                raise ConfigError("broker.auto: an elected node hosts a plain mqtt:// broker, so the "
                                  "configured ones must be mqtt:// too")
            if self.embedded_broker:
                raise ConfigError("broker.auto and broker.embedded: a node that always hosts needs no election")
            if self.protocol == "5":
                raise ConfigError("broker.auto: the broker a node hosts speaks MQTT 3.1.1, so protocol cannot be 5")

    def _check_tls(self, tls: bool) -> None:
        for name in TLS_KEYS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, value := os.fspath(value))
            if not isinstance(value, str):
                raise ConfigError(f"broker.{name} must be a file path (a text), not {value!r}")
        given = [name for name in TLS_KEYS if getattr(self, name)]
        if not given:
            return
        if not tls:
            raise ConfigError(f"broker.{', broker.'.join(given)} given, but TLS settings apply to mqtts:// "
                              "brokers only and broker.urls has none")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("broker.cert_file and broker.key_file go together: give both or neither")
        for name in given:
            path = self._tls_path(value := getattr(self, name))
            if not path.is_file():
                relative = "" if Path(value).expanduser().is_absolute() else \
                    f" ({value} is relative, so taken from the node's home, {self.home})"
                raise ConfigError(f"broker.{name}: no file {path}{relative}")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"broker.{name}: {path} is not readable")

    def _tls_path(self, value: str) -> Path:
        return self.home / Path(value).expanduser()

    @property
    def tls(self) -> TlsSettings:
        """The TLS settings for mqtts:// brokers, with paths resolved against the home."""
        paths = {name: str(self._tls_path(v)) if (v := getattr(self, name)) else None for name in TLS_KEYS}
        return TlsSettings(**paths)

    @property
    def endpoints(self) -> list[tuple[str, int, bool]]:
        """(host, port, TLS) of the brokers, in order of preference."""
        if not self.broker_urls:
            return [(self.broker_host, self.broker_port, False)]
        return [parse_broker_url(u) for u in self.broker_urls]

    def sealed_keys(self) -> dict[str, bytes]:
        """The keys of the sealed region trees, read from their files (from the home)."""
        keys = {}
        for root, name in self.sealed.items():
            path = self.home / Path(name).expanduser()
            try:
                keys[root] = path.read_bytes()
            except OSError as e:
                raise ConfigError(f"swarm.sealed: cannot read the key of {root!r}, {path}: {e.strerror}") from None
        return keys

    @property
    def certificate_path(self) -> Path:
        return self.home / Path(self.certificate).expanduser()

    @property
    def key_path(self) -> Path:
        return self.home / KEY_FILE

    @property
    def store_path(self) -> Path:
        return self.home / STORE_FILE

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @classmethod
    def load(cls, home: Path | None = None) -> Config:
        home = Path(home) if home else default_home()
        path = home / CONFIG_FILE
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no configuration at {path}; run `edgeswarm init` first") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        node, broker, rules = data.pop("node", {}), data.pop("broker", {}), data.pop("rules", [])
        swarm = data.pop("swarm", {})
        if data or not all(isinstance(t, dict) for t in (node, broker, swarm)) or not isinstance(rules, list):
            raise ConfigError(f"{path}: only [node], [broker], [swarm] and [[rules]] tables are allowed")
        try:
            rules = [Rule.from_config(r) for r in rules]
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        known_node = {"regions", "max_message_bytes", "members", "quorum", "sync_interval", "snapshot_interval",
                      "snapshots_kept", "max_clock_skew", "trace_kept", "batch",
                      "relay_votes", "votes_in_diffs"}
        known_broker = {"host", "port", "protocol", "embedded", "urls", "auto", "auto_port", "auto_address",
                        *TLS_KEYS}
        unknown = (set(node) - known_node) | (set(broker) - known_broker) \
            | (set(swarm) - {"admin", "certificate", "sealed"})
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        regions = node.get("regions", [])
        if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
            raise ConfigError(f"{path}: node.regions must be a list of region names")
        embedded = broker.get("embedded", False)
        if not isinstance(embedded, bool):
            raise ConfigError(f"{path}: broker.embedded must be true or false")
        host = broker.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{path}: broker.host must be a host name or address")
        return cls(home=home, regions=regions,
                   max_message_bytes=node.get("max_message_bytes", DEFAULT_MAX_BYTES),
                   broker_host=host, broker_port=broker.get("port", 1883),
                   protocol=str(broker.get("protocol", "auto")), embedded_broker=embedded,
                   broker_urls=_strings(broker.get("urls", []), f"{path}: broker.urls"),
                   members=node.get("members", []), quorum=node.get("quorum", 0), rules=rules,
                   sync_interval=node.get("sync_interval", 30.0),
                   snapshot_interval=node.get("snapshot_interval", 3600.0), snapshots_kept=node.get("snapshots_kept", 5),
                   max_clock_skew=node.get("max_clock_skew", 300.0), trace_kept=node.get("trace_kept", 10000),
                   batch=node.get("batch", True), relay_votes=node.get("relay_votes", True),
                   votes_in_diffs=node.get("votes_in_diffs", True),
                   swarm_admin=swarm.get("admin", ""), certificate=swarm.get("certificate", ""),
                   sealed=swarm.get("sealed", {}), broker_auto=broker.get("auto", False),
                   auto_port=broker.get("auto_port", 1883), auto_address=broker.get("auto_address", ""),
                   **{name: broker.get(name, "") for name in TLS_KEYS})

    def to_toml(self) -> str:
        # JSON strings are valid TOML basic strings.
        regions = ", ".join(json.dumps(r) for r in self.regions)
        return (
            "# edgeswarm node configuration\n"
            "[node]\n"
            f"regions = [{regions}]\n"
            f"members = [{', '.join(json.dumps(m) for m in self.members)}]\n"
            f"quorum = {self.quorum}\n"
            f"sync_interval = {self.sync_interval:g}\n"
            f"snapshot_interval = {self.snapshot_interval:g}\n"
            f"snapshots_kept = {self.snapshots_kept}\n"
            f"max_message_bytes = {self.max_message_bytes}\n"
            f"max_clock_skew = {self.max_clock_skew:g}\n"
            f"trace_kept = {self.trace_kept}\n"
            f"batch = {'true' if self.batch else 'false'}\n"
            f"relay_votes = {'true' if self.relay_votes else 'false'}\n"
            f"votes_in_diffs = {'true' if self.votes_in_diffs else 'false'}\n\n"
            "[broker]\n"
            f"host = {json.dumps(self.broker_host)}\n"
            f"port = {self.broker_port}\n"
            f'protocol = "{self.protocol}"\n'
            f"urls = [{', '.join(json.dumps(u) for u in self.broker_urls)}]\n"
            + "".join(f"{name} = {json.dumps(getattr(self, name))}\n" for name in TLS_KEYS) +
            f"embedded = {'true' if self.embedded_broker else 'false'}\n"
            f"auto = {'true' if self.broker_auto else 'false'}\n"
            f"auto_port = {self.auto_port}\n"
            f"auto_address = {json.dumps(self.auto_address)}\n\n"
            "[swarm]\n"
            f"admin = {json.dumps(self.swarm_admin)}\n"
            f"certificate = {json.dumps(self.certificate)}\n"
            f"sealed = {{{', '.join(f'{json.dumps(r)} = {json.dumps(k)}' for r, k in self.sealed.items())}}}\n"
        )

    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.config_path.exists():
            raise ConfigError(f"{self.config_path} already exists; refusing to overwrite it")
        self.config_path.write_text(self.to_toml(), encoding="utf-8")
