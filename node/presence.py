"""Birth, death and fingerprints: which nodes are alive, and how they are doing.

On every connection (a start, and each reconnect) a node counts a new session and
- leaves a signed `death` {session} with the broker as its retained MQTT will, so that the
  broker announces it if the node vanishes (power cut, crash, network loss), to the nodes
  there and to those that come later;
- publishes a signed, retained `birth` {session, regions, software, what it does — `relay`:
  it passes votes on (relay.py), `packs`: it reads trace entries packed (trace.py), `own-votes`:
  it answers a pull for its own votes, `packed-walks`: it reads a pull's steps with their hashes
  salted and their lists deflated (sync.py) — and its
  admission certificate in a swarm with a roster};
and with every anti-entropy round a retained `fingerprint`: frames, shadows (head not yet
consensus), forks, pending diffs, rejected messages, agreement with consensus, sessions, and
the bytes free on the store's disk (logged as a warning too when below LOW_DISK).
On a clean stop it publishes its death itself (retained, in case what follows is lost)
and clears its retained birth, fingerprint and death, so that a long-lived broker does not
keep announcing nodes that left. All
go on the node's own topic (es/v1/node/<id>/<kind>), the retained ones so that a newcomer
learns the swarm at once, and are only accepted from the node they name. A death counts
when its session is not older than the last birth's (as Sparkplug's bdSeq); older
messages are ignored, so retained copies delivered again change nothing. As the session
changes with every connection, a newcomer that gets a retained birth and a retained death
of one node, in either order, tells which is the later: the death of the session born, or
of one before it. (Nodes older than 0.4 keep one session across reconnects and do not
retain their will: their births and fingerprints say nothing of it, and a birth or
fingerprint of theirs after a death in the same session still counts as a rebirth.)
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from edgeswarm.shared.envelope import MalformedError
from edgeswarm.shared.topics import node_topic

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("edgeswarm.presence")

SOFTWARE = f"edgeswarm {version('edgeswarm')}"  # the installed package's version (pyproject.toml)
MAX_SESSION = 2**63 - 1  # (the store's integers)
PER_CONNECTION = {"sessions": "per-connection"}  # in births and fingerprints (see the module's text)
LOW_DISK = 64 * 2**20  # bytes free on the store's disk below which each fingerprint round warns
# What a node reads that older releases do not, said in births and fingerprints: trace entries
# packed (node/trace.py), a whole batch in a relay (node/relay.py)
READS = ("packs", "relay-batches")
# What a node answers that older releases do not (node/sync.py): a pull for its own votes alone,
# a pull whose steps name hashes salted and cut short, and carry their lists deflated
ANSWERS = ("own-votes", "packed-walks")


class Presence:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = node.store
        self.session = 0
        self._goodbye_back = threading.Event()  # this session's death came back from the broker (MQTT 3.1.1)
        self._without: dict[str, set[str]] = {ability: set() for ability in READS}  # -> live peers not saying it
        self._saying: dict[str, set[str]] = {ability: set() for ability in ANSWERS}  # -> live peers saying it

    def prepare(self) -> None:
        """Before each connection: a new session and the death the broker will hold for us
        (also called by the transport as a connection drops, before paho reconnects)."""
        node = self.node
        with self.store.transaction():
            self.session = self.store.meta("session") + 1
            self.store.set_meta("session", self.session)
            env = node.sign("death", None, {"session": self.session})
        node.transport.set_will(node_topic(node.node_id, "death"), env.raw)

    def announce(self) -> None:
        """After connecting: the birth, and a first fingerprint."""
        node = self.node
        birth = {"session": self.session, "regions": list(node.config.regions), "software": SOFTWARE,
                 **PER_CONNECTION, **self._abilities(), **self._certificate()}
        if (bus := node.handover.advertised()) is not None:
            birth["bus"] = bus  # where this node's broker would listen, were it elected (broker.auto)
        node.send_now(node_topic(node.node_id, "birth"), "birth", birth, retain=True)
        self.publish_fingerprint()

    def leave(self) -> None:
        """A clean stop: say so rather than leave it to the will."""
        node = self.node
        if node.transport.connected:
            # Retained first, and in the broker's hands before anything else goes: should the
            # clearing below not reach it before the connection closes, a newcomer still finds
            # the session ended, not a birth alone (a clean disconnect sends no will).
            self._goodbye_back.clear()
            node.send_now(node_topic(node.node_id, "death"), "death", {"session": self.session}, retain=True,
                          wait=2.0)
            if node.transport.mqtt_version == "3.1.1":
                # (amqtt acknowledges a message as it takes it, and drops what it has not yet
                # handled when the client disconnects right after: the death coming back to this
                # node, subscribed to its own topics, says the broker has handled it. MQTT 5
                # subscriptions here are no-local: nothing comes back, and Mosquitto keeps it.)
                self._goodbye_back.wait(2.0)
            # An empty retained message clears the broker's copy (of the death: this one, or
            # the will of an earlier session that ended without a goodbye).
            for kind in ("birth", "fingerprint", "death"):
                node.transport.publish(node_topic(node.node_id, kind), b"", retain=True, wait=2.0)

    def on_own(self, env: Any) -> None:
        """A message of this node's own, back from the broker."""
        if env.kind == "death" and type(env.body) is dict and env.body.get("session") == self.session:
            self._goodbye_back.set()

    def _certificate(self) -> dict:
        """This node's admission certificate, in births and (for brokers that keep no
        retained births) fingerprints."""
        own = self.node.admission.own
        return {} if own is None else {"certificate": own.raw}

    def fingerprint(self) -> dict:
        store = self.store
        frames = store.frame_counts()
        # (a copy first: other threads add counters meanwhile, and a dict that grows while a
        # generator walks it raises)
        rejected = sum(v for k, v in dict(self.node.counters).items() if k.startswith("rejected."))
        return {"session": self.session, "frames": frames["frames"], "shadows": frames["shadows"],
                "forks": store.fork_count(), "pending": store.count_pending(), "rejected": rejected,
                "agreement": 1.0 if not frames["frames"] else round(1 - frames["shadows"] / frames["frames"], 4),
                "flagged": len(store.flagged()), "disk_free": store.free_bytes(), **PER_CONNECTION, **self._bus(),
                **self._abilities(), **self._certificate()}

    def _abilities(self) -> dict:
        """That this node passes on the votes sent to it (node/relay.py), reads a whole
        batch in a relay (shared/envelope.py), reads trace entries packed (node/trace.py),
        and answers a pull for its own votes and reads a pull's steps salted and deflated
        (node/sync.py)."""
        return {**dict.fromkeys(READS + ANSWERS, True), **({"relay": True} if self.node.relay.enabled else {})}

    def _heard(self, node_id: str, body: dict | None) -> None:
        """What a live peer's birth or fingerprint says it does (None: the peer is gone)."""
        self.node.relay.on_presence(node_id, body is not None and body.get("relay") is True)
        for ability, peers in self._without.items():
            if body is not None and body.get(ability) is not True:
                peers.add(node_id)
            else:
                peers.discard(node_id)
        for ability, peers in self._saying.items():
            if body is not None and body.get(ability) is True:
                peers.add(node_id)
            else:
                peers.discard(node_id)

    def saying(self, ability: str) -> set[str]:
        """The live peers whose birth or fingerprint says they do `ability` (ANSWERS)."""
        return self._saying[ability]

    def without(self, ability: str) -> set[str]:
        """The live peers whose birth or fingerprint does not say they read `ability` (READS):
        older releases, which are sent what they read."""
        return self._without[ability]

    def _bus(self) -> dict:
        """The broker this node is on, and whether it hosts it (broker.auto): for `status`."""
        t = self.node.transport
        if not t.connected:
            return {}
        return {"broker": f"{t.host}:{t.port}", **({"hosting": True} if self.node.handover.hosting else {})}

    def publish_fingerprint(self) -> None:
        node = self.node
        fingerprint = self.fingerprint()
        if 0 <= fingerprint["disk_free"] < LOW_DISK:
            log.warning("the disk of the store %s has %s bytes free: writes fail once it is full (frame history "
                        "grows with every change: firmware-notes)", self.store.path, f"{fingerprint['disk_free']:,}")
        node.send_now(node_topic(node.node_id, "fingerprint"), "fingerprint", fingerprint, retain=True)

    # -- peers -----------------------------------------------------------------------

    def on_message(self, env: Any) -> None:
        body = env.body
        if type(body) is not dict or type(body.get("session")) is not int or not 0 <= body["session"] <= MAX_SESSION:
            raise MalformedError(f"a {env.kind} names the session")
        node_id, session = env.sender_id, body["session"]
        peer = self.store.peer(node_id)
        # A node whose session changes with every connection: a death ends its session for good.
        ended = peer is not None and not peer["alive"] and peer["death_hlc"] is not None \
            and session <= peer["session"] and body.get("sessions") == PER_CONNECTION["sessions"]
        if env.kind == "birth":
            if peer and (session, env.hlc) <= (peer["session"], peer["birth_hlc"] or 0):  # (none before a birth)
                if (session, env.hlc) == (peer["session"], peer["birth_hlc"]) and peer["alive"]:
                    self._heard(node_id, body)  # (known before a restart)
                return
            if ended:  # a retained birth of a session whose retained death came first
                return
            regions = body.get("regions")
            if type(regions) is not list or not all(type(r) is str for r in regions):
                raise MalformedError("a birth lists the node's regions")
            self.store.set_peer(node_id, session=session, birth_hlc=env.hlc, alive=1, regions=regions,
                                software=str(body.get("software", "")))
            self.node.admission.on_presence(env)  # (after the record: see Node._dispatch)
            self.node.handover.on_birth(node_id, body.get("bus"))
            self._heard(node_id, body)
            log.info("node %s is up (session %d)", node_id, session)
        elif env.kind == "death":
            if peer is not None and (session < peer["session"] or (not peer["alive"] and session == peer["session"])):
                return
            # (a death of a node not heard of yet, or of a session newer than its last birth:
            # a retained will, which a birth of that session coming later does not undo)
            self.store.set_peer(node_id, session=session, alive=0, death_hlc=env.hlc)
            self._heard(node_id, None)
            log.info("node %s is gone (session %d)", node_id, session)
        else:
            if peer and env.hlc <= (peer.get("fingerprint_hlc") or 0):
                if env.hlc == peer.get("fingerprint_hlc") and peer["alive"]:
                    self._heard(node_id, body)  # (known before a restart)
                return
            fields: dict[str, Any] = {"fingerprint": {k: v for k, v in body.items() if k != "certificate"},
                                      "fingerprint_hlc": env.hlc}
            # A fingerprint says the node runs: all a newcomer hears of it where the broker keeps
            # no retained birth for a wildcard subscription (RabbitMQ), until its next birth.
            if peer is None or session > peer["session"] or (session == peer["session"] and not peer["alive"]
                                                             and not ended and env.hlc > (peer["death_hlc"] or 0)):
                fields.update(session=session, alive=1)
            self.store.set_peer(node_id, **fields)
            self.node.admission.on_presence(env)  # (after the record: see Node._dispatch)
            if fields.get("alive", peer and peer["alive"]):
                self._heard(node_id, body)
        self.node.counters[f"presence.{env.kind}"] += 1
