"""The embedded MQTT broker: amqtt in its own thread and event loop.

Any node can host the bus. amqtt speaks MQTT 3.1.1 only, so clients of this broker use
3.1.1 (the node's transport falls back by itself). Only one plugin is loaded (see
plugins.py): an open access plugin that keeps persistent sessions, or, for a swarm with a
roster, one that admits only the swarm's nodes and keeps each to its regions. The default
set (event and packet loggers, $SYS) costs about 40 % of throughput.
amqtt is imported here only, when a broker is actually started.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterable

log = logging.getLogger("edgeswarm.broker")


class _DroppedDeliveryTrace(logging.Filter):
    """amqtt waits 5 s for a subscriber's PUBACK, then drops the delivery: it says so in one
    line (its handler's warning, with the packet id) and again as a traceback from its
    broadcast loop. A node losing power does this for every message on its way to it; the
    second telling, a traceback per message, is left out (what a program embedding the
    broker logs, and `edgeswarm -vv`: below that the CLI keeps amqtt quiet)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, TimeoutError) and "PUBACK" in str(exc))


_DROPPED = _DroppedDeliveryTrace()


class _Subscriptions(dict):
    """amqtt's table of subscriptions (topic filter: subscribers), walked through copies.
    amqtt walks it across awaits: for a connecting client, sending the retained messages
    each filter matches; for a message, asking the topic plugin about each subscriber. A
    client subscribing to a new filter meanwhile raised "dictionary changed size during
    iteration", which ended the connecting client's session handling (a CONNACK and nothing
    after), or, with a roster, that message's deliveries to the subscribers not yet reached
    (QoS 1 messages the publisher had been acknowledged, lost: amqtt 0.12)."""

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def items(self):
        return list(dict.items(self))


class BrokerError(Exception):
    """The embedded broker could not start (port taken, bad address, ...)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_listening(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port (a broker, presumably)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, admin: str = "", revoked: Iterable[str] = (),
                 tls: tuple[str, str] | None = None, start_timeout: float = 15.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.admin = admin  # a swarm admin's public key (hex): only its admitted nodes may connect
        self.revoked = sorted(revoked)  # node ids refused from the start (the broker keeps nothing across restarts)
        self.tls = tls  # (certificate file, key file) of a TLS listener (mqtts://)
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      **({"ssl": True, "certfile": self.tls[0], "keyfile": self.tls[1]}
                                         if self.tls else {})}},
            "plugins": ({"edgeswarm.broker.plugins.RosterPlugin": {"admin": self.admin, "revoked": self.revoked}}
                        if self.admin
                        else {"edgeswarm.broker.plugins.OpenAccessPlugin": {}}),
        }

    def start(self) -> EmbeddedBroker:
        if self._thread is not None:
            return self
        self._check_port_free()
        logging.getLogger("amqtt.broker").addFilter(_DROPPED)  # (a filter is added once)
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                from amqtt.broker import Broker

                async def boot() -> None:
                    self._broker = Broker(self.config())
                    self._broker._subscriptions = _Subscriptions()
                    await self._broker.start()

                loop.run_until_complete(boot())
            except BaseException as e:  # reported to the starting thread
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"edgeswarm-broker-{self.port}", daemon=True)
        self._thread.start()
        if not started.wait(self.start_timeout):
            raise BrokerError(f"embedded broker on {self.host}:{self.port} did not start in {self.start_timeout:.0f} s")
        if failure:
            self._thread = None
            raise BrokerError(f"embedded broker on {self.host}:{self.port} failed to start: {failure[0]}")
        log.info("embedded broker listening on %s:%s", self.host, self.port)
        return self

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as e:
                raise BrokerError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(timeout)
        except Exception as e:  # a broker that fails to shut down cleanly is still stopped below
            log.warning("embedded broker shutdown: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = self._broker = None
        log.info("embedded broker on %s:%s stopped", self.host, self.port)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
