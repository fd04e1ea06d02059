"""The transport's own filter: brokers are not trusted to deliver only what was asked for."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from edgeswarm.node.transport import Transport


def message(topic: str) -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(topic=topic.encode())
    m.payload = b"x"
    return m


def test_only_topics_under_a_subscription_are_passed_on_also_after_subscribing_more():
    t = Transport([("127.0.0.1", 1, False)], "es-test", protocol="3.1.1")
    got: list[str] = []
    t.on_message = lambda topic, payload: got.append(topic)
    t.subscribe(["es/v1/+/plant/#"])
    for topic in ("es/v1/diff/plant/a", "es/v1/diff/lab/a", "es/v1/diff/plant/a", "es/v1/diff/lab/a"):
        t._on_message(None, None, message(topic))
    assert got == ["es/v1/diff/plant/a"] * 2 and t.unsolicited == 2
    t.subscribe(["es/v1/+/lab/#"])  # what was unsolicited before is asked for now
    t._on_message(None, None, message("es/v1/diff/lab/a"))
    assert got[-1] == "es/v1/diff/lab/a" and t.unsolicited == 2
