"""The embedded broker as its users see it (its access control: test_broker_auth.py)."""

from __future__ import annotations

import logging
import socket
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeswarm.broker.embedded import EmbeddedBroker


def _packet(kind: int, body: bytes) -> bytes:
    assert len(body) < 128  # (one byte of remaining length)
    return bytes([kind, len(body)]) + body


def _text(s: str) -> bytes:
    return len(s).to_bytes(2, "big") + s.encode()


def silent_subscriber(host: str, port: int, topic: str) -> socket.socket:
    """An MQTT 3.1.1 client that subscribes at QoS 1 and never acknowledges a message (as a
    board that lost power looks to the broker until its keepalive runs out)."""
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(_packet(0x10, _text("MQTT") + bytes([4, 0x02, 0, 60]) + _text("silent")))
    assert s.recv(4)[:1] == b"\x20"  # CONNACK
    s.sendall(_packet(0x82, b"\x00\x01" + _text(topic) + b"\x01"))
    assert s.recv(5)[:1] == b"\x90"  # SUBACK
    return s


class _Seen(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_delivery_nobody_acknowledges_is_told_in_one_line_not_a_traceback(caplog):
    # (as a program embedding the broker logs it; the CLI keeps amqtt quiet below -vv)
    caplog.set_level(logging.WARNING, logger="amqtt")
    gave_up = _Seen("Timeout waiting for PUBACK")
    logging.getLogger().addHandler(gave_up)
    with EmbeddedBroker() as broker:
        silent = silent_subscriber(broker.host, broker.port, "es/v1/test/silent")
        subscribed, got = threading.Event(), threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = lambda *a: got.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        try:
            c.subscribe("es/v1/test/after", qos=1)
            assert subscribed.wait(10)
            c.publish("es/v1/test/silent", b"x", qos=1).wait_for_publish(5)
            assert gave_up.event.wait(15), "the broker never gave up on the delivery"  # (amqtt: after 5 s)
            # the broker tells of the failed delivery again as it handles the next message
            c.publish("es/v1/test/after", b"y", qos=1)
            assert got.wait(10)
        finally:
            logging.getLogger().removeHandler(gave_up)
            c.loop_stop()
            c.disconnect()
            silent.close()
    told = [r for r in caplog.records if "PUBACK" in r.getMessage() or (r.exc_info and "PUBACK" in str(r.exc_info[1]))]
    assert len(told) == 1 and told[0].exc_info is None, [r.getMessage() for r in told]


def _client(broker: EmbeddedBroker, name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def test_clients_connecting_while_others_subscribe_are_all_served():
    """The broker walks its table of subscriptions, pausing at each to send the retained
    messages it matches, for every client that connects; a subscription to a new topic
    filter by another client meanwhile used to end the connecting client's session
    handling (it got its CONNACK and nothing after: no SUBACK, no message)."""
    with EmbeddedBroker() as broker:
        keeper = _client(broker, "keeper")
        filters = [f"es/v1/test/kept/{i}" for i in range(100)]
        for t in filters:
            keeper.publish(t, b"r", qos=1, retain=True).wait_for_publish(5)
        keeper.subscribe([(t, 0) for t in filters])
        adding = threading.Event()
        def subscribe_new() -> None:  # (one at a time: each SUBACK awaited)
            acked = threading.Semaphore(1)
            adder = _client(broker, "adder")
            adder.on_subscribe = lambda *a: acked.release()
            try:
                j = 0
                while not adding.is_set() and acked.acquire(timeout=5):
                    adder.subscribe(f"es/v1/test/new/{j}", qos=0)
                    j += 1
            finally:
                adder.disconnect()
                adder.loop_stop()
        thread = threading.Thread(target=subscribe_new)
        thread.start()
        unserved = []
        try:
            for k in range(20):
                subscribed = threading.Event()
                c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"joiner-{k}", protocol=mqtt.MQTTv311)
                c.on_connect = lambda c_, *a: c_.subscribe("es/v1/test/joined", qos=1)
                c.on_subscribe = lambda *a, e=subscribed: e.set()
                c.connect(broker.host, broker.port)
                c.loop_start()
                served = subscribed.wait(3)
                c.disconnect()
                c.loop_stop()
                if not served:
                    unserved.append(k)
                    break
        finally:
            adding.set()
            thread.join(10)
            keeper.disconnect()
            keeper.loop_stop()
        assert not unserved, f"clients {unserved} got no SUBACK"
