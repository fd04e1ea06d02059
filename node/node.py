"""Node: one peer of the swarm, and the public Python API.

    from edgeswarm.node import Node, Config
    with Node(Config(home="/var/lib/edgeswarm", regions=["plant/line1"])) as node:
        v = node.put("plant/line1", "conveyor", {"speed": 1.2})
        node.patch("plant/line1", "conveyor", set={("limits", "max"): 2.0})
        node.get("plant/line1", "conveyor")

Write path: read the head, make the diff, store the new version and the signed envelope in
one transaction (the envelope stays in the outbox until the broker acknowledges it),
publish. Receive path: decode (size, shape, signature, topic), replay window, parent
lookup (missing parent: kept pending), apply, check the version hash, store. A message
that fails any step is counted by reason and never raises out of the receive loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from edgeswarm.shared import diff
from edgeswarm.shared.clock import HybridClock
from edgeswarm.shared.envelope import (Envelope, EnvelopeError, MalformedError, accept_seq, decode,
                                       encode)
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import region_covers, region_filter, region_topic, validate_region

from .config import Config
from .store import FrameVersion, Store
from .transport import Transport

log = logging.getLogger("edgeswarm.node")

MAX_KEY_BYTES = 256
Path = tuple[str, ...] | list[str] | str
Callback = Callable[[FrameVersion], None]


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES or "\x00" in key:
        raise ValueError(f"a frame key is non-empty text of at most {MAX_KEY_BYTES} bytes without NUL")
    return key


def _path(p: Path) -> list[str]:
    parts = [p] if isinstance(p, str) else list(p)
    if not parts or any(not isinstance(k, str) for k in parts):
        raise ValueError(f"a path is a key or a tuple of keys, not {p!r}")
    return parts


class Node:
    def __init__(self, config: Config, *, identity: Identity | None = None, client_tag: str = "") -> None:
        self.config = config
        self.identity = identity or Identity.load_or_create(config.key_path)
        self.node_id = self.identity.node_id
        self.store = Store(config.store_path)
        self.clock = HybridClock(self.store.meta("hlc"))
        self.counters: Counter[str] = Counter()
        self._subscribers: list[tuple[str | None, Callback]] = []
        self._sub_lock = threading.Lock()
        self._acks = threading.Condition()
        self._activity = threading.Condition()
        self._inflight: dict[int, bytes] = {}
        self._early_acks: set[int] = set()
        client_id = f"es-{self.node_id}" + (f"-{client_tag}" if client_tag else "")
        self.transport = Transport(config.broker_host, config.broker_port, client_id, protocol=config.protocol)
        self.transport.on_message = self._on_message
        self.transport.on_ack = self._on_ack

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Node:
        """Connect to the broker, follow the configured regions, send what the outbox holds."""
        self.transport.subscribe(region_filter(r) for r in self.config.regions)
        self.transport.connect()
        for item in self.store.unpublished():
            self._publish(item.msg_id, item.envelope)
        return self

    def stop(self) -> None:
        self.transport.close()
        self.store.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading ---------------------------------------------------------------------

    def get(self, region: str, key: str) -> dict | None:
        """The current value of a frame; None when it does not exist or was deleted."""
        fv = self.store.head(region, key)
        return None if fv is None else fv.value

    def head(self, region: str, key: str) -> FrameVersion | None:
        return self.store.head(region, key)

    def history(self, region: str, key: str) -> list[FrameVersion]:
        return self.store.history(region, key)

    def regions(self) -> list[str]:
        return self.store.regions()

    def keys(self, region: str) -> list[str]:
        return self.store.keys(region)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    # -- writing ---------------------------------------------------------------------

    def put(self, region: str, key: str, value: Mapping) -> str:
        """Replace the whole value of a frame; returns the new version (hex)."""
        value = diff.normalize(value)
        if type(value) is not dict:
            raise ValueError(f"a frame value is a map, not {type(value).__name__}")
        return self._change(region, key, lambda old: value)

    def patch(self, region: str, key: str, set: Mapping[Path, Any] | None = None,
              delete: Iterable[Path] = ()) -> str:
        """Set and delete keys (nested paths as tuples) in a frame; returns the new version (hex)."""
        ops = [["del", _path(p)] for p in delete]
        ops += [["set", _path(p), diff.normalize(v)] for p, v in (set or {}).items()]
        if not ops:
            raise ValueError("patch needs at least one key to set or delete")
        return self._change(region, key, lambda old: diff.apply(old, ops))

    def delete(self, region: str, key: str) -> str:
        """Delete a frame (a new version whose value is null; history is kept)."""
        def tombstone(old: dict | None) -> None:
            if old is None:
                raise KeyError(f"no frame {key!r} in region {region!r}")
            return None
        return self._change(region, key, tombstone)

    def _change(self, region: str, key: str, compute: Callable[[dict | None], dict | None]) -> str:
        validate_region(region)
        validate_key(key)
        with self.store.transaction():
            head = self.store.head(region, key)
            old = None if head is None else head.value
            new = compute(old)
            ops = diff.make(old, new)
            if not ops:
                return head.version if head is not None else self._no_change(region, key)
            parent = None if head is None else bytes.fromhex(head.version)
            version = diff.version_hash(region, key, parent, new)
            seq, hlc = self.store.next_seq(), self.clock.now()
            env = encode(self.identity, "diff", region, seq, hlc,
                         {"key": key, "parent": parent, "version": version, "ops": ops})
            if len(env.raw) > self.config.max_message_bytes:
                raise ValueError(f"this change is {len(env.raw)} bytes once signed; the limit is "
                                 f"{self.config.max_message_bytes} (node.max_message_bytes)")
            self.store.add_version(region, key, version, parent, new, self.node_id, hlc)
            self.store.add_diff(env.msg_id, self.node_id, seq, region, key, version, parent, env.raw,
                                "applied", published=False)
            self.store.set_meta("hlc", hlc)
        self.counters["sent"] += 1
        self._publish(env.msg_id, env.raw, region)
        self._notify(FrameVersion(region, key, version.hex(), None if parent is None else parent.hex(),
                                  new, self.node_id, hlc, "shadow"))
        return version.hex()

    @staticmethod
    def _no_change(region: str, key: str) -> str:
        raise ValueError(f"nothing to write: frame {key!r} in region {region!r} does not exist")

    def _publish(self, msg_id: bytes, raw: bytes, region: str | None = None) -> None:
        if region is None:
            region = decode(raw, max_bytes=len(raw)).region
        mid = self.transport.publish(region_topic("diff", region), raw)
        if mid is None:
            return  # not started: the envelope stays in the outbox until start()
        with self._acks:
            if mid in self._early_acks:  # the broker answered before we recorded the id
                self._early_acks.discard(mid)
                self.store.mark_published(msg_id)
            else:
                self._inflight[mid] = msg_id

    def _on_ack(self, mid: int) -> None:
        with self._acks:
            msg_id = self._inflight.pop(mid, None)
            if msg_id is None:
                self._early_acks.add(mid)
            else:
                self.store.mark_published(msg_id)
            self._acks.notify_all()

    def wait_published(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has acknowledged everything this node sent."""
        with self._acks:
            return self._acks.wait_for(lambda: not self._inflight, timeout)

    # -- subscriptions ---------------------------------------------------------------

    def subscribe(self, callback: Callback, region: str | None = None) -> Callable[[], None]:
        """Call `callback(FrameVersion)` for every stored change in `region` (and below, or
        everywhere when None). Callbacks run in the network thread: keep them short.
        Returns a function that unsubscribes."""
        if region is not None:
            validate_region(region)
        entry = (region, callback)
        with self._sub_lock:
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._sub_lock:
                if entry in self._subscribers:
                    self._subscribers.remove(entry)
        return unsubscribe

    async def changes(self, region: str | None = None) -> AsyncIterator[FrameVersion]:
        """Async iterator over stored changes in `region` (and below)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[FrameVersion] = asyncio.Queue()
        unsubscribe = self.subscribe(lambda fv: loop.call_soon_threadsafe(queue.put_nowait, fv), region)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    def _notify(self, fv: FrameVersion) -> None:
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for region, callback in subscribers:
            if region is None or region_covers(region, fv.region):
                try:
                    callback(fv)
                except Exception:
                    log.exception("subscriber callback failed")

    # -- receiving -------------------------------------------------------------------

    def _reject(self, reason: str, detail: str) -> None:
        self.counters[f"rejected.{reason}"] += 1
        n = self.counters[f"rejected.{reason}"]
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: visible without flooding the log
            log.warning("rejected message (%s, %d so far): %s", reason, n, detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self.receive(topic, payload)
        except Exception:  # a bug must not stop the network thread
            self.counters["rejected.internal"] += 1
            log.exception("internal error while handling a message on %s", topic)
        with self._activity:
            self._activity.notify_all()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until `condition()` holds, re-checking after each message this node handles."""
        with self._activity:
            return self._activity.wait_for(condition, timeout)

    def receive(self, topic: str, payload: bytes) -> None:
        """Handle one message as it came from the broker."""
        self.counters["received"] += 1
        try:
            env = decode(payload, max_bytes=self.config.max_message_bytes, topic=topic)
        except EnvelopeError as e:
            self._reject(e.reason, f"{topic}: {e}")
            return
        if env.sender == self.identity.public_key:
            self.counters["own"] += 1
            return
        if env.kind != "diff":
            self.counters[f"ignored.{env.kind}"] += 1
            return
        applied = self._receive_diff(env)
        for fv in applied:
            self._notify(fv)

    def _receive_diff(self, env: Envelope) -> list[FrameVersion]:
        sender = env.sender_id
        with self.store.transaction():
            top, mask = self.store.sender_window(sender)
            try:
                top, mask = accept_seq(top, mask, env.seq)
            except EnvelopeError as e:
                self._reject(e.reason, f"from {sender}: {e}")
                return []
            self.store.set_sender_window(sender, env.sender, top, mask, env.hlc)
            self.clock.observe(env.hlc)
            try:
                body = _diff_body(env.body)
            except (MalformedError, ValueError) as e:
                self._reject("bad-diff", f"from {sender}: {e}")
                return []
            key, parent, version, ops = body
            if self.store.has_version(version):
                self.store.add_diff(env.msg_id, sender, env.seq, env.region, key, version, parent, env.raw, "applied")
                self.counters["known"] += 1
                return []
            if parent is not None and not self.store.has_version(parent):
                self.store.add_diff(env.msg_id, sender, env.seq, env.region, key, version, parent, env.raw, "pending")
                self.counters["pending"] += 1
                return []
            fv = self._apply(env, key, parent, version, ops)
            if fv is None:
                return []
            self.store.add_diff(env.msg_id, sender, env.seq, env.region, key, version, parent, env.raw, "applied")
            applied = [fv]
            applied += self._apply_pending(version)
            return applied

    def _apply(self, env: Envelope, key: str, parent: bytes | None, version: bytes, ops: list) -> FrameVersion | None:
        """Apply a diff to its stored parent and store the result if the hash matches."""
        sender = env.sender_id
        if parent is None:
            old = None
        else:
            info = self.store.version_info(parent)
            if info is None or info[:2] != (env.region, key):
                self._reject("bad-diff", f"from {sender}: parent belongs to another frame")
                return None
            old = info[2]
        try:
            new = diff.apply(old, ops)
        except diff.DiffError as e:
            self._reject("bad-diff", f"from {sender}: {e}")
            return None
        if diff.version_hash(env.region, key, parent, new) != version:
            self._reject("wrong-hash", f"from {sender}: parent + diff does not give version {version.hex()[:16]}")
            return None
        self.store.add_version(env.region, key, version, parent, new, sender, env.hlc)
        self.counters["applied"] += 1
        log.info("stored %s/%s version %s from %s", env.region, key, version.hex(), sender)
        return FrameVersion(env.region, key, version.hex(), None if parent is None else parent.hex(),
                            new, sender, env.hlc, "shadow")

    def _apply_pending(self, version: bytes) -> list[FrameVersion]:
        """Apply the diffs that were waiting for `version`, and those waiting for them."""
        applied: list[FrameVersion] = []
        ready = [version]
        while ready:
            for item in self.store.pending_children(ready.pop()):
                env = decode(item.envelope, max_bytes=len(item.envelope))
                key, parent, child, ops = _diff_body(env.body)
                fv = self._apply(env, key, parent, child, ops)
                self.store.set_diff_status(item.msg_id, "applied" if fv else "rejected")
                if fv is not None:
                    self.counters["pending-applied"] += 1
                    applied.append(fv)
                    ready.append(child)
        return applied


def _diff_body(body: Any) -> tuple[str, bytes | None, bytes, list]:
    if type(body) is not dict or body.keys() != {"key", "parent", "version", "ops"}:
        raise MalformedError("a diff body is a map of key, parent, version and ops")
    key, parent, version, ops = body["key"], body["parent"], body["version"], body["ops"]
    validate_key(key)
    for h in (parent, version):
        if h is not None and (type(h) is not bytes or len(h) != diff.HASH_BYTES):
            raise MalformedError(f"a version hash is {diff.HASH_BYTES} bytes")
    if version is None:
        raise MalformedError("a diff names its new version")
    diff.check_ops(ops)
    return key, parent, version, ops
