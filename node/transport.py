"""The MQTT connection: the only module that imports paho.

Speaks MQTT 5 where the broker does (content type `application/cbor`, no-local
subscriptions) and MQTT 3.1.1 otherwise; with protocol "auto" it tries 5 first and falls
back to 3.1.1 when the broker refuses the protocol version (amqtt does).
Resubscribes after every reconnect; paho reconnects by itself in its network thread.
Given several brokers, connects to the first that answers and, when the connection is lost
and not back within FAILOVER_AFTER seconds, goes on to the next (round the list).
mqtts:// brokers are checked against the CA file of the TLS settings (or the system's
certificate authorities), and a client certificate is shown when the settings have one.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeswarm.shared.envelope import CONTENT_TYPE

log = logging.getLogger("edgeswarm.transport")

# The properties of every MQTT 5 publish (the content type, for ordinary MQTT tools): made
# once, as paho packs them anew for each message.
_PUBLISH_PROPS = Properties(PacketTypes.PUBLISH)
_PUBLISH_PROPS.ContentType = CONTENT_TYPE

FAILOVER_AFTER = 5.0  # seconds without the broker before trying the next one
PROBE_TIMEOUT = 2.0  # seconds to wait for an answer to an MQTT 5 CONNECT in "auto" mode
SESSION_EXPIRY = 7 * 24 * 3600  # seconds a broker keeps a persistent session of an absent node
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class Unacked:
    """Packet ids sent and not yet acknowledged, each with the sender's token. paho may
    deliver an acknowledgement before the sender has recorded the id it got back, so an
    acknowledgement for an id not recorded yet is kept (with what it said: whether a
    publish succeeded, which filters of a subscribe were refused) until the id is recorded.
    Every id sent must be recorded, or those kept would pile up and match a later message
    once packet ids wrap. Not locked: callers hold their own lock."""

    def __init__(self) -> None:
        self._waiting: dict[int, object] = {}
        self._early: dict[int, object] = {}

    def sent(self, mid: int, token: object = None) -> object:
        """Record a sent id. None while unacknowledged; if its acknowledgement already
        came, what it said."""
        if mid in self._early:
            return self._early.pop(mid)
        self._waiting[mid] = token
        return None

    def acked(self, mid: int, said: object = True) -> tuple[bool, object]:
        """(whether the id was recorded, its token); `said` is kept for an id not recorded yet."""
        if mid in self._waiting:
            return True, self._waiting.pop(mid)
        self._early[mid] = said
        return False, None

    def clear(self) -> None:
        self._waiting.clear()
        self._early.clear()

    def __len__(self) -> int:
        """Ids held: sent and waiting, or acknowledged before they were recorded."""
        return len(self._waiting) + len(self._early)


class TransportError(Exception):
    """The broker cannot be reached or refused the connection."""


@dataclass(frozen=True)
class TlsSettings:
    """PEM files for mqtts:// brokers: the CA(s) to trust (None: the system's) and an
    optional client certificate with its key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _ssl_reason(text: str) -> str:
    """An OpenSSL error without its library tag and source line."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", re.sub(r"^.*\[\w+: \w+\]\s*", "", text)).strip()


MessageHandler = Callable[[str, bytes], None]


def _no_delay(client, userdata, sock) -> None:
    """Small packets go out at once: with Nagle's algorithm a PUBACK or vote written while an
    earlier packet is unacknowledged waits for the peer's delayed ACK (40 ms on Linux)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Transport:
    def __init__(self, endpoints: list[tuple[str, int, bool]], client_id: str, *, protocol: str = "auto",
                 keepalive: int = 30, connect_timeout: float = 10.0, persistent: bool = False,
                 tls: TlsSettings | None = None, credentials: tuple[str, str] | None = None) -> None:
        if protocol not in ("auto", *PROTOCOLS):
            raise TransportError(f"unknown MQTT protocol {protocol!r}; use auto, 5 or 3.1.1")
        if not endpoints:
            raise TransportError("no broker to connect to")
        self.endpoints = list(endpoints)  # (host, port, TLS), in order of preference
        self._at = 0  # the one in use
        self.configured = len(self.endpoints)  # the first ones; others are added by move()
        self.failover = True  # go round the configured brokers when one is lost (off: someone else moves us)
        self.max_reconnect_delay = 30  # seconds paho waits at most between attempts
        self.client_id = client_id
        self.protocol = protocol
        self.tls = tls or TlsSettings()  # used with mqtts:// endpoints
        self.credentials = credentials  # (user name, password) for brokers that ask
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        # A persistent session makes the broker queue QoS 1 messages while this client is
        # away (a restart, a crash, a network cut) and deliver them when it returns.
        self.persistent = persistent
        self.on_message: MessageHandler | None = None
        self.on_ack: Callable[[object], None] | None = None  # called with a publish's token once the broker has it
        self.on_connected: Callable[[], None] | None = None
        self.will: tuple[str, bytes] | None = None  # (topic, payload) the broker publishes, retained, if we vanish
        self.on_disconnected: Callable[[], None] | None = None  # (before paho reconnects: to re-arm the will)
        self._filters: set[str] = set()
        self._solicited: dict[str, bool] = {}  # topic -> whether a filter matches it (a swarm has few topics)
        self.unsolicited = 0  # messages on topics this client did not subscribe to, dropped
        self._client: mqtt.Client | None = None
        self._version = 0
        self._connected = threading.Event()
        self._state = threading.Condition()
        self._failover_timer: threading.Timer | None = None
        self._moving = False  # move() dropped the connection
        self._refused: str | None = None
        self._tls_failure: str | None = None  # a TLS error the network thread met before any CONNACK
        self._pub_lock = threading.Condition()
        self._pubs = Unacked()  # kept across reconnects: paho resends unacknowledged QoS 1 messages
        self._answered = threading.Event()
        self._suback = threading.Condition()
        self._subs = Unacked()
        self.refused: set[str] = set()  # filters the broker refused (the node hears nothing there)

    @property
    def host(self) -> str:
        return self.endpoints[self._at][0]

    @property
    def port(self) -> int:
        return self.endpoints[self._at][1]

    @property
    def at(self) -> int:
        """The index in `endpoints` of the broker in use (or being tried)."""
        return self._at

    @property
    def local_address(self) -> str | None:
        """The address this client reaches its broker from, while connected."""
        c = self._client
        sock = c.socket() if c is not None else None
        try:
            return sock.getsockname()[0] if isinstance(sock, socket.socket) else None
        except OSError:
            return None

    @property
    def mqtt_version(self) -> str:
        return "5" if self._version == mqtt.MQTTv5 else "3.1.1"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- connection ------------------------------------------------------------------

    def connect(self) -> None:
        """Connect to the first broker that answers, waiting for its answer; TransportError
        with the reason(s) otherwise."""
        reasons = []
        for at in range(len(self.endpoints)):
            self._at = at
            try:
                self._connect_here()
                return
            except TransportError as e:
                reasons.append(str(e))
        raise TransportError("; ".join(reasons))

    def connect_later(self) -> None:
        """Start without a broker: paho keeps trying the current one in the background
        (with the protocol fixed, as there is no broker to ask) until move() says otherwise."""
        if self.protocol == "auto":
            raise TransportError("connect_later needs a fixed protocol")
        c = self._new_client(PROTOCOLS[self.protocol])
        self._answered.set()  # (no handshake is waited for: a lost connection is reported as such)
        c.connect_async(self.host, self.port, **self._connect_options())
        c.loop_start()

    def move(self, endpoint: tuple[str, int, bool]) -> None:
        """Go to `endpoint` (added to the endpoints if new): the connection, if any, is
        dropped and paho's next reconnect goes there, resending what is unacknowledged."""
        with self._state:
            if endpoint not in self.endpoints:
                self.endpoints.append(endpoint)
            self._at = self.endpoints.index(endpoint)
            c = self._client
        if c is None:
            return
        log.warning("moving to broker %s:%s", self.host, self.port)
        c.connect_async(self.host, self.port, **self._connect_options())
        sock = c.socket()
        if isinstance(sock, socket.socket):
            self._moving = True  # (the disconnect that follows is ours)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # paho sees the connection lost and reconnects
            except OSError:
                pass

    def _connect_here(self) -> None:
        versions = [PROTOCOLS[self.protocol]] if self.protocol != "auto" else [mqtt.MQTTv5, mqtt.MQTTv311]
        for i, version in enumerate(versions):
            last = i == len(versions) - 1
            refusal = self._try_connect(version, probe=not last)
            if refusal is None:
                return
            self._stop_client()
            if last or "protocol" not in refusal.lower():
                raise TransportError(f"broker {self.host}:{self.port} refused the connection: {refusal}")
            log.info("broker does not speak MQTT 5 (%s); using 3.1.1", refusal)

    def _try_connect(self, version: int, probe: bool = False) -> str | None:
        self._refused = self._tls_failure = None
        self._answered.clear()
        c = self._new_client(version)
        try:
            c.connect(self.host, self.port, **self._connect_options())
        except ssl.SSLError as e:
            self._client = None
            raise TransportError(f"TLS handshake with broker {self.host}:{self.port} failed: "
                                 f"{_ssl_reason(str(e))}{self._trusting(e)}") from None
        except OSError as e:
            self._client = None
            raise TransportError(f"cannot reach broker {self.host}:{self.port}: {e.strerror or e}") from None
        c.loop_start()
        answered = self._answered.wait(min(self.connect_timeout, PROBE_TIMEOUT) if probe else self.connect_timeout)
        c.on_log = None
        if self._tls_failure is not None and not probe:
            self._stop_client()
            hint = "did it refuse the client certificate?" if self.tls.cert_file else \
                "no client certificate given; does it require one?"
            raise TransportError(f"broker {self.host}:{self.port} closed the TLS connection before answering: "
                                 f"{self._tls_failure} ({hint})")
        if not answered:
            self._stop_client()
            if probe:  # amqtt neither answers nor closes an MQTT 5 CONNECT that has properties
                return "no answer to an MQTT 5 CONNECT (unsupported protocol version?)"
            raise TransportError(f"broker {self.host}:{self.port} did not answer within {self.connect_timeout:.0f} s")
        if self._refused is None and not self.wait_subscribed(self.connect_timeout):
            self._stop_client()
            raise TransportError(f"broker {self.host}:{self.port} did not confirm the subscriptions")
        if self._refused is None and self.refused:
            self._stop_client()
            raise TransportError(f"broker {self.host}:{self.port} refused the subscription to "
                                 f"{', '.join(sorted(self.refused))} (a NATS server refuses '.' and spaces in topic "
                                 "levels; an ACL may forbid them)")
        return self._refused

    def _new_client(self, version: int) -> mqtt.Client:
        self._version = version
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=version,
                        clean_session=None if version == mqtt.MQTTv5 else not self.persistent)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(1, self.max_reconnect_delay)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_connect_fail = self._on_connect_fail
        c.on_socket_open = _no_delay
        if self.credentials is not None:
            c.username_pw_set(*self.credentials)
        if self.will is not None:
            self._arm_will(c)
        if self.endpoints[self._at][2]:
            self._tls_set(c)
        self._client = c
        return c

    def _tls_set(self, c: mqtt.Client) -> None:
        t = self.tls
        try:
            c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            files = ", ".join(f for f in (t.ca_file, t.cert_file, t.key_file) if f)
            raise TransportError(f"cannot use the TLS files for broker {self.host}:{self.port} ({files}): "
                                 f"{_ssl_reason(str(e))}") from None
        c.on_log = self._on_log  # until the broker answers: a TLS alert after the handshake shows only there

    def _trusting(self, e: ssl.SSLError) -> str:
        if not isinstance(e, ssl.SSLCertVerificationError):
            return ""
        return f" (trusting {self.tls.ca_file or 'the system certificate authorities'})"

    def _on_log(self, client, userdata, level, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and not self._answered.is_set():
            self._tls_failure = _ssl_reason(buf.partition(": ")[2] or buf)

    def _connect_options(self) -> dict:
        """CONNECT settings: keepalive and, in MQTT 5, the session kept (or not) while away."""
        if self._version != mqtt.MQTTv5:
            return {"keepalive": self.keepalive}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY if self.persistent else 0
        return {"keepalive": self.keepalive, "clean_start": not self.persistent, "properties": props}

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._answered.set()
            client.disconnect()
            return
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Diffs and votes are small and sent back to back: without this, Nagle's algorithm
            # holds the second one until the broker acknowledges the first (tens of ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._suback:  # a dropped connection never acknowledges its subscriptions
            self._subs.clear()
            self.refused.clear()
        self._subscribe(client, self._filters)
        self._connected.set()
        self._answered.set()
        self._changed()
        log.info("connected to %s:%s (MQTT %s)", self.host, self.port, self.mqtt_version)
        if self.on_connected:
            self.on_connected()

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._answered.is_set():
            self._refused = "connection closed during the handshake; unsupported protocol version?"
            self._answered.set()

    def set_will(self, topic: str, payload: bytes) -> None:
        """The will for the next connection (paho's own reconnects included)."""
        self.will = (topic, payload)
        if self._client is not None:
            self._arm_will(self._client)

    def _arm_will(self, c: mqtt.Client) -> None:
        c.will_set(*self.will, qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self._changed()
        if self.on_disconnected is not None:
            try:
                self.on_disconnected()
            except Exception:  # (the next connection then keeps the will it had)
                log.exception("re-arming the will failed")
        if not self._answered.is_set():
            # Closed before any CONNACK: an MQTT 3.1.1-only broker may just drop an MQTT 5 CONNECT.
            self._refused = f"connection closed ({reason_code}); unsupported protocol version?"
            self._answered.set()
        elif self._moving:
            self._moving = False
        elif reason_code.is_failure:
            log.warning("disconnected from %s:%s: %s; reconnecting", self.host, self.port, reason_code)
            if self.failover and self.configured > 1:
                self._arm_failover(client)

    def _arm_failover(self, client: mqtt.Client) -> None:
        """One timer at a time: every failed reconnect attempt is another disconnect."""
        with self._state:
            if self._failover_timer is not None:
                return
            timer = self._failover_timer = threading.Timer(FAILOVER_AFTER, self._failover, (client,))
        timer.daemon = True
        timer.start()

    def _failover(self, client: mqtt.Client) -> None:
        """Still without a broker: paho's next reconnect goes to the next one."""
        with self._state:
            self._failover_timer = None
        if self.connected or client is not self._client or not self.failover:
            return
        self._at = (self._at + 1) % self.configured
        log.warning("trying broker %s:%s", self.host, self.port)
        client.connect_async(self.host, self.port, **self._connect_options())
        self._arm_failover(client)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_state(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition()` holds, checked again at each connect and disconnect."""
        with self._state:
            return self._state.wait_for(condition, timeout)

    def _changed(self) -> None:
        with self._state:
            self._state.notify_all()

    def _stop_client(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.disconnect()
            c.loop_stop()
        self._connected.clear()

    def close(self) -> None:
        self._stop_client()

    # -- subscriptions ---------------------------------------------------------------

    def subscribe(self, filters: Iterable[str]) -> None:
        new = [f for f in filters if f not in self._filters]
        self._filters.update(new)
        self._solicited = {}
        if self._client is not None and self.connected and new:
            self._subscribe(self._client, new)

    def _subscribe(self, client: mqtt.Client, filters: Iterable[str]) -> None:
        filters = sorted(filters)
        if not filters:
            return
        if self._version == mqtt.MQTTv5:
            rc, mid = client.subscribe([(f, SubscribeOptions(qos=1, noLocal=True)) for f in filters])
        else:
            rc, mid = client.subscribe([(f, 1) for f in filters])
        if rc == mqtt.MQTT_ERR_SUCCESS:
            with self._suback:  # (the filters are the token: a SUBACK says which it refused)
                refused = self._subs.sent(mid, filters)
                if refused is not None:  # already acknowledged, with the positions it refused
                    self._note_refused(filters, refused)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [i for i, rc in enumerate(reason_codes) if rc.is_failure]
        with self._suback:
            _, filters = self._subs.acked(mid, failed)
            if filters is not None:  # (else they are noted when the subscribe records its id)
                self._note_refused(filters, failed)
            for i in failed:
                log.error("broker %s:%s refused a subscription (%s): %s", self.host, self.port,
                          filters[i] if filters is not None and i < len(filters) else f"filter {i + 1}",
                          reason_codes[i])
            self._suback.notify_all()

    def _note_refused(self, filters: list[str], positions: list[int]) -> None:
        """The filters at `positions` of a SUBACK's list were refused (held under _suback)."""
        self.refused.update(filters[i] for i in positions if i < len(filters))

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged every subscription sent so far."""
        with self._suback:
            return self._suback.wait_for(lambda: not self._subs, timeout)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        # Brokers are not trusted to filter: amqtt 0.12 sends a connecting client the
        # retained messages of every subscription in the broker, not only its own.
        topic = message.topic
        solicited = self._solicited.get(topic)
        if solicited is None:
            if len(self._solicited) >= 4096:
                self._solicited = {}
            solicited = self._solicited[topic] = any(mqtt.topic_matches_sub(f, topic) for f in self._filters)
        if not solicited:
            self.unsolicited += 1
            return
        if self.on_message is not None:
            self.on_message(topic, message.payload)

    # -- publishing ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: float | None = None, token: object = None) -> int | None:
        """Queue a message; returns its message id, or None when connect() has not been
        called. With a token, `on_ack(token)` is called once the broker has acknowledged it
        (perhaps before this returns). With `wait`, block until the broker has it (up to that
        many seconds)."""
        if self._client is None:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain,
                                    properties=_PUBLISH_PROPS if self._version == mqtt.MQTTv5 else None)
        if qos > 0:
            with self._pub_lock:
                acked = self._pubs.sent(info.mid, token)
            if acked and token is not None and self.on_ack is not None:
                self.on_ack(token)
        if wait:
            try:
                info.wait_for_publish(wait)
            except (RuntimeError, ValueError):  # the connection went away meanwhile
                pass
        return info.mid

    def wait_acked(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged every message published (tokens or not)
        and nothing is left in the acknowledgement bookkeeping."""
        with self._pub_lock:
            return self._pub_lock.wait_for(lambda: not self._pubs, timeout)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._pub_lock:
            known, token = self._pubs.acked(mid, not reason_code.is_failure)
            self._pub_lock.notify_all()
        if known and token is not None and self.on_ack is not None and not reason_code.is_failure:
            self.on_ack(token)
