"""The `edgeswarm` command: a thin layer over Node, Transport and EmbeddedBroker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeswarm.broker.embedded import BrokerError, EmbeddedBroker
from edgeswarm.shared.envelope import Envelope, EnvelopeError, decode_many
from edgeswarm.shared import roster
from edgeswarm.shared.identity import Identity, IdentityError, node_id_of, write_secret
from edgeswarm.shared.roster import RosterError, parse_admin_key
from edgeswarm.shared.sealing import Seals, SealError, is_sealed, new_key
from edgeswarm.shared.topics import TopicError, node_topic, region_filter, validate_region

from .config import TLS_KEYS, Config, ConfigError, default_home
from .bodies import validate_key
from .node import Node
from .provision import ProvisionError, write_bundle
from . import snapshot, systemd
from .snapshot import SnapshotError
from .store import StoreError
from .transport import Transport, TransportError

log = logging.getLogger("edgeswarm")

ADMIN_KEY = "swarm.key"
CERTIFICATE_FILE = "admission.cert"
_EXPECTED = (ConfigError, ProvisionError, IdentityError, RosterError, StoreError, TransportError, BrokerError,
             TopicError, EnvelopeError, SnapshotError, ValueError, KeyError, OSError)


def to_json(obj: Any) -> Any:
    """CBOR data as JSON: byte strings become hex text."""
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def _print_json(obj: Any, stream=None) -> None:
    print(json.dumps(to_json(obj), ensure_ascii=False, sort_keys=True), file=stream or sys.stdout, flush=True)


def _version_json(fv) -> dict:
    return {"version": fv.version, "parents": list(fv.parents), "author": fv.author, "hlc": fv.hlc,
            "state": fv.state, "value": fv.value}


def _tls_args(args: argparse.Namespace) -> dict[str, str]:
    """--ca-file, --cert-file and --key-file as given, made absolute ("" stays: not set)."""
    return {name: str(Path(value).expanduser().absolute()) if value else ""
            for name in TLS_KEYS if (value := getattr(args, name, None)) is not None}


def _load_config(args: argparse.Namespace, config: Config | None = None) -> Config:
    """The node's configuration (or `config`) with the command line's broker options applied."""
    config = config or Config.load(args.home)
    if getattr(args, "host", None):
        config.broker_host = args.host
    if getattr(args, "port", None):
        config.broker_port = args.port
    if getattr(args, "broker", None):
        config.broker_urls = args.broker
    for name, value in _tls_args(args).items():
        setattr(config, name, value)
    if getattr(args, "embedded_broker", False):
        config.embedded_broker = True
    if config.embedded_broker:
        config.protocol = "3.1.1"  # amqtt speaks nothing else
    config.validate()
    return config


def _stop_on_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM. Install it before announcing readiness."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _watch(node: Node, stop: threading.Event) -> None:
    """Until stopped: under systemd with a watchdog, ping it while the node is healthy, and
    stop pinging (systemd then restarts the node) when it is not."""
    every = systemd.watchdog_interval()
    if every is None:
        return _wait(stop)
    while not stop.wait(min(every, 1.0)):
        trouble = node.trouble()
        if trouble is None:
            systemd.notify("WATCHDOG=1")
        else:
            log.error("%s: no more watchdog pings, so systemd restarts this node", trouble)
            systemd.notify(f"STATUS={trouble}")


def _wait(stop: threading.Event) -> None:
    while not stop.wait(1.0):  # wake up now and then so the main thread sees signals
        pass


# -- commands --------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    home = Path(args.home or default_home())
    certificate = args.certificate.read_bytes() if args.certificate else None
    config = Config(home=home, regions=args.region or [], broker_host=args.host or "127.0.0.1",
                    broker_port=1883 if args.port is None else args.port, protocol=args.protocol,
                    embedded_broker=args.embedded_broker, broker_urls=args.broker or [], **_tls_args(args),
                    swarm_admin=args.admin or "", certificate=CERTIFICATE_FILE if certificate else "",
                    broker_auto=args.auto_broker, auto_port=args.auto_port, auto_address=args.auto_address)
    config.save()
    identity = Identity.load_or_create(config.key_path)
    if certificate is not None:
        config.certificate_path.write_bytes(certificate)
    print(f"node {identity.node_id} initialised in {home}")
    print(f"  key:    {config.key_path} (keep it private); public key {identity.public_key.hex()}")
    print(f"  config: {config.config_path}")
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    identity = Identity.load(Config(home=Path(args.home or default_home())).key_path)
    out = {"node": identity.node_id, "public_key": identity.public_key.hex()}
    if args.broker_password:  # for the admin's broker-config; a secret: it proves this node's key
        config = Config.load(args.home)
        if not config.certificate:
            raise ConfigError("this node has no admission certificate (swarm.certificate) to log in with")
        out["broker_password"] = roster.broker_password(identity, config.certificate_path.read_bytes())
    _print_json(out)
    return 0


# -- the swarm admin's commands (on the admin's machine, never on a board) ---------------------

def _admin(args: argparse.Namespace, create: bool = False) -> Identity:
    path = Path(args.admin_dir or os.environ.get("EDGESWARM_ADMIN") or Path.home() / ".edgeswarm-admin") / ADMIN_KEY
    if create:
        if path.exists():
            raise ConfigError(f"{path} already exists: this machine already holds a swarm admin key")
        return Identity.load_or_create(path)
    if not path.exists():
        raise ConfigError(f"no swarm admin key at {path} (edgeswarm swarm create)")
    return Identity.load(path)


def _node_key(text: str) -> bytes:
    try:
        return parse_admin_key(text)  # (the same form: 64 hex digits)
    except RosterError:
        raise ValueError(f"a node is named by its public key, 64 hex digits (edgeswarm id), not {text!r}") from None


def cmd_seal_key(args: argparse.Namespace) -> int:
    write_secret(args.out, new_key())
    print(f"region key written to {args.out}: copy it to every node of the region, and to no one else")
    return 0


def cmd_swarm_create(args: argparse.Namespace) -> int:
    admin = _admin(args, create=True)
    print(f"swarm admin key made; give the boards this public key (swarm.admin): {admin.public_key.hex()}")
    return 0


def cmd_admit(args: argparse.Namespace) -> int:
    admin, key = _admin(args), _node_key(args.node)
    now = int(time.time() * 1000)
    raw = roster.issue(admin, key, args.region, now + int(args.days * 86_400_000), now)
    out = args.out or Path(f"{node_id_of(key)}.cert")
    out.write_bytes(raw)
    print(f"admission certificate for node {node_id_of(key)} ({', '.join(sorted(set(args.region)))}, "
          f"{args.days:g} days) written to {out}")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    admin = None if args.open else _admin(args)
    identity = write_bundle(args.out, regions=args.region, brokers=args.broker, admin=admin, days=args.days,
                            members=args.member or [], quorum=args.quorum, auto=args.auto_broker,
                            auto_port=args.auto_port, auto_address=args.auto_address, wheel=args.wheel,
                            platform=args.platform, python=args.python, with_wheels=not args.no_wheelhouse)
    print(f"bundle for node {identity.node_id} written to {args.out}"
          f"{'' if admin is None else ' (admitted to ' + ', '.join(args.region) + ')'}; it holds the node's private "
          f"key: read {args.out / 'README.txt'}, flash one board, then delete it")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from edgeswarm.broker.mosquitto import RECOMMENDED, site_settings
    logins = {}
    for n, line in enumerate(args.logins.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
                logins[item["node"]] = item["broker_password"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{args.logins}:{n}: not a line of `edgeswarm id --broker-password`") from None
    out = args.out.absolute()
    settings = site_settings(out, logins, _admin(args))
    tls = [f"{name} {Path(value).absolute()}" for name, value in
           (("cafile", args.tls_cafile), ("certfile", args.tls_certfile), ("keyfile", args.tls_keyfile)) if value]
    conf = out / "edgeswarm.conf"
    conf.write_text("\n".join(["# Mosquitto for an edgeswarm swarm (edgeswarm broker-config mosquitto)",
                               "per_listener_settings false", f"listener {args.port}{' ' + args.host if args.host else ''}",
                               *tls, *RECOMMENDED, *settings]) + "\n", encoding="utf-8")
    print(f"{conf}: {len(logins)} nodes and the admin; run mosquitto -c {conf}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    admin, key = _admin(args), _node_key(args.node)
    raw = roster.revocation(admin, key, int(time.time() * 1000))
    node_id = node_id_of(key)
    if args.out:
        args.out.write_bytes(raw)
    if args.broker:
        config = _load_config(args, Config(home=Path(tempfile.gettempdir()), protocol=args.protocol))
        transport = Transport(config.endpoints, f"es-admin-{Identity.generate().node_id}", protocol=config.protocol,
                              tls=config.tls, credentials=(roster.ADMIN_USERNAME, roster.admin_password(admin)))
        transport.connect()
        try:  # retained: nodes that connect later learn it too
            if transport.publish(node_topic(node_id, "revoke"), raw, retain=True, wait=10.0) is None:
                raise TransportError("the broker did not acknowledge the revocation")
        finally:
            transport.close()
    print(f"node {node_id} revoked" + (f"; published on {', '.join(args.broker)}" if args.broker else "")
          + (f"; written to {args.out}" if args.out else ""))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    stop = _stop_on_signal()
    if bool(args.tls_certfile) != bool(args.tls_keyfile):
        raise ConfigError("--tls-certfile and --tls-keyfile go together")
    tls = (args.tls_certfile, args.tls_keyfile) if args.tls_certfile else None
    if args.revocation and not args.admin:
        raise ConfigError("--revocation needs --admin, the key that signed it")
    revoked = [roster.check_revocation(path.read_bytes(), parse_admin_key(args.admin)) for path in args.revocation or []]
    broker = EmbeddedBroker(args.host or "127.0.0.1", args.port or 1883, admin=args.admin or "", revoked=revoked,
                            tls=tls).start()
    print(f"edgeswarm broker listening on {broker.host}:{broker.port} (MQTT 3.1.1{', TLS' if tls else ''})", flush=True)
    try:
        _wait(stop)
    finally:
        broker.stop()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    stop = _stop_on_signal()
    broker = None
    with systemd.more_time():  # (its store may be migrated to this release's schema now)
        node = Node(config)
    if config.embedded_broker:  # (refusing from the start the nodes revoked as far as this node knows)
        try:
            broker = EmbeddedBroker(config.broker_host, config.broker_port, admin=config.swarm_admin,
                                    revoked=node.admission.revoked()).start()
        except BaseException:
            node.stop()
            raise
    try:
        while not stop.is_set():
            try:
                node.start()
                break
            except TransportError as e:
                log.warning("%s; retrying in 5 s", e)
                stop.wait(5.0)
        if not stop.is_set():
            print(f"node {node.node_id} running: broker {node.transport.host}:{node.transport.port}"
                  f"{' (embedded)' if broker else ''}{' (or one the swarm elects)' if config.broker_auto else ''}, "
                  f"regions {', '.join(config.regions) or '(none)'}", flush=True)
            systemd.notify(f"READY=1\nSTATUS=node {node.node_id} running")
        _watch(node, stop)
    finally:
        systemd.notify("STOPPING=1")
        node.stop()
        if broker:
            broker.stop()
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    validate_region(args.region)
    if args.batch is None:
        if args.key is None or args.value is None:
            raise ValueError("put needs a key and a JSON value (or --batch FILE)")
        changes = [(args.key, _json_value(args.value, "value"))]
    else:
        if args.key is not None or args.value is not None:
            raise ValueError("put takes a key and a value, or --batch FILE, not both")
        text = sys.stdin.read() if args.batch == "-" else Path(args.batch).read_text(encoding="utf-8")
        changes = _batch_lines(text.splitlines())
    for key, _ in changes:
        validate_key(key)
    node = Node(_load_config(args), client_tag="put")
    try:
        node.start()
        with node.batch():  # (all or none; one message for the lot)
            versions = [node.put(args.region, key, value) for key, value in changes]
        if not node.wait_published(args.timeout):
            raise TransportError(f"the broker did not acknowledge within {args.timeout:.0f} s; "
                                 "the changes are stored and will be sent by the next run")
    finally:
        node.stop()
    for version in versions:
        print(version)
    return 0


def _json_value(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _batch_lines(lines: list[str]) -> list[tuple[str, Any]]:
    """[key, value] of each line {"key": ..., "value": {...}} (blank lines skipped)."""
    changes = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = _json_value(line, f"line {n}")
        if not isinstance(item, dict) or set(item) != {"key", "value"} or not isinstance(item["key"], str):
            raise ValueError(f'line {n}: a change is {{"key": "...", "value": {{...}}}}')
        changes.append((item["key"], item["value"]))
    if not changes:
        raise ValueError("the batch holds no change")
    return changes


@contextmanager
def _local_node(args: argparse.Namespace) -> Iterator[Node]:
    """The node's store and keys, for reading: no broker connection."""
    node = Node(Config.load(args.home))
    try:
        yield node
    finally:
        node.store.close()


def cmd_get(args: argparse.Namespace) -> int:
    with _local_node(args) as node:
        if args.key is None:
            for key in node.keys(args.region):
                fv = node.head(args.region, key)
                _print_json({"key": key, "version": fv.version, "author": fv.author, "value": fv.value})
        elif args.history:
            for fv in node.history(args.region, args.key):
                _print_json(_version_json(fv))
        else:
            fv = node.consensus(args.region, args.key) if args.consensus else node.head(args.region, args.key)
            if fv is None or fv.value is None:
                raise KeyError(f"no frame {args.key!r} in region {args.region!r}")
            _print_json(fv.value)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _local_node(args) as node:
        if args.region is None:
            print(f"{'node':<18}{'alive':<7}{'session':>8}{'frames':>8}{'shadows':>9}{'forks':>7}{'pending':>9}"
                  f"{'rejected':>10}{'disk free':>11}  {'broker (* hosts it)':<22}  regions")
            for node_id, peer in node.swarm().items():
                fp = peer.get("fingerprint") or {}
                mark = "*" if peer.get("self") else " "
                print(f"{node_id + mark:<18}{'yes' if peer['alive'] else 'no':<7}{peer['session'] or 0:>8}"
                      + "".join(f"{fp.get(k, '-'):>{w}}" for k, w in (("frames", 8), ("shadows", 9), ("forks", 7),
                                                                      ("pending", 9), ("rejected", 10)))
                      + f"{_bytes(fp.get('disk_free')):>11}"
                      + f"  {str(fp.get('broker', '-')) + ('*' if fp.get('hosting') else ''):<22}"
                      + f"  {', '.join(peer.get('regions') or [])}")
            return 0
        keys = [args.key] if args.key else node.keys(args.region)
        if not keys:
            raise KeyError(f"no frames in region {args.region!r}")
        for key in keys:
            status = node.status(args.region, key)
            if args.key is None:
                status = {k: status[k] for k in ("key", "head", "consensus", "state", "forks")}
            _print_json(status)
    return 0


def _bytes(n: object) -> str:
    """A byte count as `status` shows it (1.5G, 820M, 12K); '-' when unknown."""
    if type(n) is not int or n < 0:
        return "-"
    for unit, size in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n // size}{unit}"
    return f"{n}B"


def cmd_forks(args: argparse.Namespace) -> int:
    with _local_node(args) as node:
        for fv in node.forks(args.region, args.key):
            _print_json(_version_json(fv))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _local_node(args) as node:
        _print_json(node.metrics())
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    with _local_node(args) as node:
        print(node.snapshot())
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    config = Config.load(args.home)
    path = args.file or snapshot.latest(config.home)
    if path is None:
        raise SnapshotError(f"no snapshot in {config.home / snapshot.RECOVERY_DIR}; give one with --file")
    result = snapshot.restore(config, path, trusted=set(config.members) or None)
    print(f"restored {result['frames']} frames from {path} (signed by {result['signer']})")
    if result["moved_aside"]:
        print(f"the previous store is kept as {result['moved_aside']}")
    print("start the node (edgeswarm run): peers bring the rest by anti-entropy")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    with _local_node(args) as node:
        node_id = args.node or node.node_id
        entries = node.trace.entries(node_id, args.since)
        if not entries and args.since == 0:
            raise KeyError(f"no trace of node {node_id} here (known: {', '.join(node.store.traced_nodes()) or 'none'})")
        for entry in entries:
            for line in entry.to_json():
                _print_json(line)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    try:
        config = _load_config(args)
        max_bytes = config.max_message_bytes
    except ConfigError:
        if args.home:
            raise
        config, max_bytes = _load_config(args, Config(home=default_home())), None
    seen = 0
    done = _stop_on_signal()
    seals = Seals({args.region: args.sealed_key.read_bytes()} if args.sealed_key else config.sealed_keys())

    def on_message(topic: str, payload: bytes) -> None:
        try:  # (a batch, or an author's relay of votes, holds several)
            envs = decode_many(payload, topic=topic, **({"max_bytes": max_bytes} if max_bytes else {}))
        except EnvelopeError as e:
            _print_json({"topic": topic, "rejected": e.reason, "detail": str(e)}, sys.stderr)
            return
        for env in envs:
            if not done.is_set():
                show(topic, env)

    def show(topic: str, env: Envelope) -> None:
        nonlocal seen
        body = env.body
        if env.region is not None and is_sealed(body) and seals.box(env.region) is not None:
            try:
                body = seals.open(env.region, body)
            except SealError as e:
                _print_json({"topic": topic, "rejected": e.reason, "detail": str(e)}, sys.stderr)
                return
        _print_json({"topic": topic, "kind": env.kind, "region": env.region, "sender": env.sender_id,
                     "seq": env.seq, "hlc": env.hlc, "body": body})
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    credentials = None
    if config.swarm_admin and config.certificate:  # a broker that checks the roster: log in as this node
        identity = Identity.load(config.key_path)
        credentials = (identity.node_id, roster.broker_password(identity, config.certificate_path.read_bytes()))
    transport = Transport(config.endpoints, f"es-watch-{Identity.generate().node_id}", protocol=config.protocol,
                          tls=config.tls, credentials=credentials)
    transport.on_message = on_message
    transport.subscribe([region_filter(args.region)])
    transport.connect()
    print(f"watching {region_filter(args.region)} on {transport.host}:{transport.port}", file=sys.stderr, flush=True)
    try:
        if not done.wait(args.timeout) and args.count:
            print(f"edgeswarm: watch saw {seen} of {args.count} messages before the timeout", file=sys.stderr)
            return 1
    finally:
        transport.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(nodes=args.nodes, home=args.dir)


def cmd_swarm_sim(args: argparse.Namespace) -> int:
    from .harness import HarnessError
    from .swarmsim import Workload, report, run
    w = Workload(nodes=args.nodes, regions=args.regions, writers=args.writers, rate=args.rate, seconds=args.seconds,
                 conflicts=args.conflicts, outages=args.outages, seed=args.seed, voters=args.voters)
    w.check()
    try:
        if args.broker:
            figures, broker = run(w, args.broker, args.protocol), ", ".join(args.broker)
        else:
            with EmbeddedBroker() as embedded:
                figures, broker = run(w, [embedded.url], "3.1.1"), f"the embedded broker ({embedded.url})"
    except HarnessError as e:  # a node process that would not start, or died
        print(f"edgeswarm: swarm-sim failed: {e}", file=sys.stderr)
        return 1
    print(report(w, figures, broker))
    return 0 if figures["settled"] and not figures["lost"] else 1


# -- entry point -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeswarm", description="An equal-peer swarm sharing signed frames over MQTT.")
    p.add_argument("--home", type=Path, help="node directory (default $EDGESWARM_HOME or ~/.edgeswarm)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: broker too)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def broker_opts(sp: argparse.ArgumentParser, urls: bool = True) -> None:
        sp.add_argument("--host", help="broker host (overrides the config)")
        sp.add_argument("--port", type=int, help="broker port (overrides the config)")
        if urls:
            sp.add_argument("--broker", action="append", metavar="URL",
                            help="mqtt://host:port or mqtts://host:port; repeat for brokers to fail over to "
                                 "(overrides the config)")
            sp.add_argument("--ca-file", metavar="PEM",
                            help="CA certificate(s) to trust for mqtts:// brokers (default: the system's)")
            sp.add_argument("--cert-file", metavar="PEM",
                            help="client certificate for mqtts:// brokers that ask for one (with --key-file)")
            sp.add_argument("--key-file", metavar="PEM", help="the client certificate's private key "
                            "(paths of these three are from the current directory; they override the config)")

    def auto_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--auto-broker", action="store_true",
                        help="when no broker answers, the swarm elects a node to host one (broker.auto)")
        sp.add_argument("--auto-port", type=int, default=1883, help="where this node's broker listens if elected")
        sp.add_argument("--auto-address", default="", help="the address peers reach it at (default: the one it "
                                                           "reaches its broker from)")

    sp = sub.add_parser("init", help="create this node's key and configuration")
    broker_opts(sp)
    sp.add_argument("--region", action="append", help="a region tree to follow (repeatable)")
    sp.add_argument("--protocol", default="auto", choices=["auto", "5", "3.1.1"])
    sp.add_argument("--embedded-broker", action="store_true", help="host the broker in this node")
    auto_opts(sp)
    sp.add_argument("--admin", metavar="HEX", help="the swarm admin's public key (a swarm with a roster)")
    sp.add_argument("--certificate", type=Path, help="this node's admission certificate (copied into the home)")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("id", help="this node's id and public key (what `admit` needs)")
    sp.add_argument("--broker-password", action="store_true",
                    help="also the password this node logs in to a roster-checking broker with (a secret)")
    sp.set_defaults(func=cmd_id)

    def admin_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--admin-dir", type=Path, help="where the swarm admin key is (default $EDGESWARM_ADMIN "
                                                       "or ~/.edgeswarm-admin)")

    sp = sub.add_parser("seal-key", help="make a key for a sealed region (encrypted diffs and votes)")
    sp.add_argument("--out", type=Path, required=True)
    sp.set_defaults(func=cmd_seal_key)

    sp = sub.add_parser("swarm", help="swarm administration: `swarm create` makes the admin key")
    sp.add_argument("action", choices=["create"])
    admin_opts(sp)
    sp.set_defaults(func=cmd_swarm_create)

    sp = sub.add_parser("admit", help="sign an admission certificate for a node (admin)")
    sp.add_argument("node", help="the node's public key (edgeswarm id on the board)")
    sp.add_argument("--region", action="append", required=True, help="a region tree it may write in (repeatable)")
    sp.add_argument("--days", type=float, default=365.0, help="valid for this many days")
    sp.add_argument("--out", type=Path, help="certificate file (default NODE-ID.cert)")
    admin_opts(sp)
    sp.set_defaults(func=cmd_admit)

    sp = sub.add_parser("provision", help="write one board's bundle: key, certificate, config, systemd unit, "
                                          "offline wheelhouse and first-boot scripts (admin)")
    sp.add_argument("--out", type=Path, required=True, help="the bundle directory to make")
    sp.add_argument("--region", action="append", required=True, help="a region tree the node follows and may "
                                                                     "write in (repeatable)")
    sp.add_argument("--broker", action="append", required=True, metavar="URL",
                    help="the swarm's broker, mqtt://host:port (repeat for brokers to fail over to)")
    auto_opts(sp)
    sp.add_argument("--member", action="append", help="a member node id (repeatable; default: the roster decides)")
    sp.add_argument("--quorum", type=int, default=0,
                    help="votes that make consensus (default: a majority of the members the node knows; give it "
                         "for a roster swarm, where a board that has heard no one yet knows only itself)")
    sp.add_argument("--days", type=float, default=365.0, help="the admission certificate is valid this many days")
    sp.add_argument("--open", action="store_true", help="an open swarm: no admin key, no certificate")
    sp.add_argument("--platform", default="host", choices=["host", "aarch64", "x86_64"],
                    help="the board's architecture, for the wheelhouse (default: this machine's)")
    sp.add_argument("--python", default="3.11", help="the board's Python version, with --platform (default 3.11, "
                                                     "Raspberry Pi OS bookworm's); host: this Python's")
    sp.add_argument("--wheel", type=Path, help="edgeswarm's wheel (default: built from the source tree)")
    sp.add_argument("--no-wheelhouse", action="store_true", help="leave out the wheels (the board has network)")
    admin_opts(sp)
    sp.set_defaults(func=cmd_provision)

    sp = sub.add_parser("broker-config", help="write a site broker's configuration for the swarm (admin)")
    sp.add_argument("kind", choices=["mosquitto"])
    sp.add_argument("--logins", type=Path, required=True,
                    help="the nodes' `edgeswarm id --broker-password` lines, one per node")
    sp.add_argument("--out", type=Path, required=True, help="directory for edgeswarm.conf, passwords and acl")
    sp.add_argument("--port", type=int, default=1883)
    sp.add_argument("--host", help="address to listen on (default: all)")
    sp.add_argument("--tls-cafile", help="TLS listener: CA file")
    sp.add_argument("--tls-certfile", help="TLS listener: the broker's certificate")
    sp.add_argument("--tls-keyfile", help="TLS listener: its key")
    admin_opts(sp)
    sp.set_defaults(func=cmd_broker_config)

    sp = sub.add_parser("revoke", help="sign a node's revocation and publish it, retained (admin)")
    sp.add_argument("node", help="the node's public key")
    sp.add_argument("--out", type=Path, help="also write the signed revocation here")
    admin_opts(sp)
    broker_opts(sp)
    sp.add_argument("--protocol", default="auto", choices=["auto", "5", "3.1.1"])
    sp.set_defaults(func=cmd_revoke)

    sp = sub.add_parser("broker", help="run an embedded broker alone")
    broker_opts(sp, urls=False)
    sp.add_argument("--admin", metavar="HEX", help="a swarm admin's public key: only its admitted nodes may "
                                                   "connect, each kept to its regions")
    sp.add_argument("--tls-certfile", metavar="PEM", help="a TLS listener (mqtts://): the broker's certificate")
    sp.add_argument("--tls-keyfile", metavar="PEM", help="and its key")
    sp.add_argument("--revocation", action="append", type=Path, metavar="FILE",
                    help="a revocation (edgeswarm revoke --out) to enforce from the start (repeatable); the broker "
                         "keeps none across restarts")
    sp.set_defaults(func=cmd_broker)

    sp = sub.add_parser("run", help="run the node until stopped")
    broker_opts(sp)
    sp.add_argument("--embedded-broker", action="store_true", help="host the broker in this node")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("put", help="replace a frame's value (JSON) and publish the change")
    broker_opts(sp)
    sp.add_argument("region")
    sp.add_argument("key", nargs="?")
    sp.add_argument("value", nargs="?", help='a JSON object, e.g. \'{"speed": 1.2}\'')
    sp.add_argument("--batch", metavar="FILE", help='changes as JSON lines {"key": ..., "value": {...}} ("-": '
                                                    "standard input), written together: one transaction and "
                                                    "one signed message")
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_put)

    sp = sub.add_parser("get", help="print a frame (or a region's frames) from the local store")
    sp.add_argument("region")
    sp.add_argument("key", nargs="?")
    sp.add_argument("--history", action="store_true", help="every version of the frame, with its state")
    sp.add_argument("--consensus", action="store_true", help="the consensus value instead of this node's head")
    sp.set_defaults(func=cmd_get)

    sp = sub.add_parser("status", help="the swarm as a table; with REGION [KEY]: head, consensus, votes and forks")
    sp.add_argument("region", nargs="?")
    sp.add_argument("key", nargs="?")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("forks", help="the branches of a frame that conflict with its head (never deleted)")
    sp.add_argument("region")
    sp.add_argument("key")
    sp.set_defaults(func=cmd_forks)

    sp = sub.add_parser("metrics", help="convergence, conflict rate, access latency and trace depth, as JSON")
    sp.set_defaults(func=cmd_metrics)

    sp = sub.add_parser("snapshot", help="write a signed snapshot of the consensus state to <home>/recovery")
    sp.set_defaults(func=cmd_snapshot)

    sp = sub.add_parser("restore", help="rebuild the store from a snapshot (the last own one, or --file)")
    sp.add_argument("--file", type=Path, help="a snapshot file, e.g. copied from a peer")
    sp.set_defaults(func=cmd_restore)

    sp = sub.add_parser("trace", help="a node's signed, hash-chained trace as JSON lines (default: this node)")
    sp.add_argument("node", nargs="?", help="node id (a peer's trace is the copy fetched from it)")
    sp.add_argument("--since", type=int, default=0, help="only entries after this sequence number")
    sp.set_defaults(func=cmd_trace)

    sp = sub.add_parser("watch", help="print verified messages of a region tree as JSON lines")
    broker_opts(sp)
    sp.add_argument("region")
    sp.add_argument("--sealed-key", type=Path, help="the region's key, to open sealed bodies "
                    "(default: the node home's swarm.sealed keys)")
    sp.add_argument("--count", type=int, default=0, help="exit after this many messages")
    sp.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    sp.set_defaults(func=cmd_watch)

    sp = sub.add_parser("demo", help="embedded broker + local nodes writing frames and converging")
    sp.add_argument("--nodes", type=int, default=3)
    sp.add_argument("--dir", type=Path, help="keep the nodes' files here (default: a temporary directory)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("swarm-sim", help="N node processes on one broker under a workload: convergence, conflicts, "
                                          "latency, trace depth, throughput")
    sp.add_argument("--nodes", type=int, default=20)
    sp.add_argument("--regions", type=int, default=2)
    sp.add_argument("--writers", type=int, default=2, help="writers per region")
    sp.add_argument("--rate", type=float, default=2.0, help="writes per second per writer")
    sp.add_argument("--seconds", type=float, default=10.0, help="how long the load runs")
    sp.add_argument("--conflicts", type=float, default=0.05, help="share of writes made as a concurrent pair")
    sp.add_argument("--outages", type=int, default=2, help="nodes (not writers) that lose power for 3 s")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--voters", type=int, default=0, help="nodes that are members and vote (the writers among "
                    "them); the others follow the regions without voting (default 0: every node votes)")
    sp.add_argument("--broker", action="append", metavar="URL", help="a broker to run on instead of an embedded "
                    "one; repeat for a cluster's endpoints (the nodes are spread over them)")
    sp.add_argument("--protocol", default="auto", choices=["auto", "5", "3.1.1"])
    sp.set_defaults(func=cmd_swarm_sim)
    return p


def setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except _EXPECTED as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"edgeswarm: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
