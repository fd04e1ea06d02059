"""`broker auto`: any node can host the bus.

With `[broker] auto = true`, a node that has lost its broker and finds none of the
configured ones answering takes part in an election with no messages: every node ranks the
same candidates the same way and walks them in order.

- Candidates are the nodes that said in their birth where their embedded broker would
  listen (`bus`, an mqtt:// URL) and that are not known to be gone, this node included,
  ranked by node id. What births said is kept in `<home>/bus-hosts.json`, so a node that
  restarts during an outage still knows them.
- Walking the ranking, a node moves to the first other candidate whose broker answers.
  When none does, it starts its own embedded broker, but only once it has been without a
  broker for FAILOVER_AFTER + rank x HOST_STEP seconds (rank: its place in the ranking):
  the candidates ranked before it had their turn first, so in the usual case exactly the
  first live candidate hosts and the others join it.
- Two hosts (a race, or a partition that healed) find each other: a host probes the
  candidates ranked before it, and moves to one that answers; its own broker is stopped
  HANDBACK_GRACE seconds later, which sends its clients looking again.
- While on an elected broker, every node probes the configured brokers; as soon as one
  answers it moves back. The host goes back too and stops its broker after HANDBACK_GRACE
  seconds, which sends any straggler to look for the configured broker again.

Nothing is lost in a move: a change is in the node's outbox until a broker acknowledges it
(paho resends what is unacknowledged to the new broker), and every (re)connection starts
an anti-entropy round that fetches what was published elsewhere meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from edgeswarm.broker.embedded import is_listening

from .config import ConfigError, parse_broker_url
from .transport import FAILOVER_AFTER

if TYPE_CHECKING:
    from edgeswarm.broker.embedded import EmbeddedBroker

    from .node import Node

log = logging.getLogger("edgeswarm.handover")

HOSTS_FILE = "bus-hosts.json"
CHECK_EVERY = 1.0  # seconds between looks at the connection
HOST_STEP = 4.0  # seconds each candidate ranked before this node is given to start its broker
HANDBACK_GRACE = 5.0  # seconds an elected host keeps its broker after moving back or away
MAX_HOSTS = 1024  # candidates remembered

Endpoint = tuple[str, int, bool]


def answers(endpoint: Endpoint) -> bool:
    """Whether a broker accepts a TCP connection at `endpoint`."""
    return is_listening(endpoint[0], endpoint[1], timeout=1.0)


class Handover:
    def __init__(self, node: Node) -> None:
        self.node = node
        config = node.config
        self.enabled = config.broker_auto
        self.configured: list[Endpoint] = list(config.endpoints)
        self.port = config.auto_port
        self.address = config.auto_address
        self._path = config.home / HOSTS_FILE
        self.hosts: dict[str, Endpoint] = self._load() if self.enabled else {}
        self.broker: EmbeddedBroker | None = None  # while this node hosts the bus
        self._advertised: str | None = None  # (kept: while the broker is lost there is no local address)
        self._lost_since: float | None = None
        self._retire_at: float | None = None  # when to stop our broker (after a move away from it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()  # notified when this node starts or stops hosting
        if self.enabled:  # (before the transport connects: paho takes its reconnect delays then)
            node.transport.failover = False  # moves are decided here
            node.transport.max_reconnect_delay = 2

    # -- what births say ---------------------------------------------------------------

    def advertised(self) -> str | None:
        """Where this node's broker would listen, for its birth (None: not a candidate)."""
        if not self.enabled:
            return None
        address = self.address or self.node.transport.local_address
        if address:
            self._advertised = f"mqtt://{address}:{self.port}"
        return self._advertised

    def own(self) -> Endpoint | None:
        url = self.advertised()
        return parse_broker_url(url) if url else None

    def on_birth(self, node_id: str, bus: object) -> None:
        """A peer's birth: where its broker would be (a URL), or nothing."""
        if not self.enabled or node_id == self.node.node_id:
            return
        endpoint = None
        if isinstance(bus, str):
            try:
                endpoint = parse_broker_url(bus)
            except ConfigError:
                self.node.counters["rejected.bus-address"] += 1
                return
            if endpoint[2] or (node_id not in self.hosts and len(self.hosts) >= MAX_HOSTS):
                return
        if self.hosts.get(node_id) == endpoint:
            return
        if endpoint is None:
            self.hosts.pop(node_id, None)
        else:
            self.hosts[node_id] = endpoint
        self._save()

    def _load(self) -> dict[str, Endpoint]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            return {str(k): parse_broker_url(v) for k, v in list(data.items())[:MAX_HOSTS]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, ConfigError) as e:  # a damaged file: learnt again from births
            log.warning("ignoring %s: %s", self._path, e)
            return {}

    def _save(self) -> None:
        data = {k: f"mqtt://{h}:{p}" for k, (h, p, _) in sorted(self.hosts.items())}
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            os.replace(tmp, self._path)
        except OSError as e:
            log.warning("cannot write %s: %s", self._path, e)

    def candidates(self) -> list[tuple[str, Endpoint]]:
        """(node id, broker address) of the nodes that may host, in the order all rank them:
        this node and the peers that announced an address and are not known to be gone (or
        outside the swarm's members)."""
        node = self.node
        ranked = []
        own = self.own()
        if own is not None:
            ranked.append((node.node_id, own))
        flagged = node.store.flagged()
        members = set(node.config.members)
        for node_id, endpoint in self.hosts.items():
            peer = node.store.peer(node_id)
            if (peer is not None and not peer["alive"]) or node_id in flagged or (members and node_id not in members):
                continue
            ranked.append((node_id, endpoint))
        return sorted(ranked)

    # -- the loop ----------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"edgeswarm-handover-{self.node.node_id}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._retire()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_EVERY):
            try:
                self.check(time.monotonic())
            except Exception:  # the next look tries again
                log.exception("broker hand-over check failed")

    def check(self, now: float) -> None:
        t = self.node.transport
        if self._retire_at is not None and now >= self._retire_at:
            self._retire()
        if t.connected:
            self._lost_since = None
            if t.at < t.configured:
                if self.broker is not None and self._retire_at is None:
                    self._retire_at = now + HANDBACK_GRACE
                return
            for endpoint in self.configured:  # on an elected broker: back as soon as a configured one answers
                if answers(endpoint):
                    log.warning("broker %s:%s is back", *endpoint[:2])
                    t.move(endpoint)
                    return
            if self.broker is not None and self._retire_at is None:
                self._give_way(t)
            return
        if self._lost_since is None:
            self._lost_since = now
        lost = now - self._lost_since
        if lost < FAILOVER_AFTER:
            return
        for endpoint in self.configured:
            if answers(endpoint):
                t.move(endpoint)
                self._lost_since = now
                return
        ranked = self.candidates()
        me = self.node.node_id
        for node_id, endpoint in ranked:  # a broker one of them already hosts comes first
            if node_id != me and answers(endpoint):
                log.warning("no configured broker answers: moving to node %s's broker", node_id)
                t.move(endpoint)
                self._lost_since = now
                if self.broker is not None:
                    self._retire_at = now + HANDBACK_GRACE
                return
        rank = next((i for i, (node_id, _) in enumerate(ranked) if node_id == me), None)
        if rank is None:  # (no address to offer yet: this node never reached a broker)
            return
        if self.broker is None and lost >= FAILOVER_AFTER + rank * HOST_STEP:
            self._host(ranked[rank][1])
        if self.broker is not None:
            self._retire_at = None
            t.move(ranked[rank][1])
            self._lost_since = now

    def _give_way(self, t) -> None:
        """Hosting: if a candidate ranked before this node hosts too, go there."""
        for node_id, endpoint in self.candidates():
            if node_id == self.node.node_id:
                return
            if answers(endpoint):
                log.warning("node %s hosts the bus too and ranks first: moving there", node_id)
                t.move(endpoint)
                self._retire_at = time.monotonic() + HANDBACK_GRACE
                return

    def _host(self, endpoint: Endpoint) -> None:
        from edgeswarm.broker.embedded import BrokerError, EmbeddedBroker

        bind = self.address or "0.0.0.0"
        try:
            self.broker = EmbeddedBroker(bind, endpoint[1], admin=self.node.config.swarm_admin,
                                         revoked=self.node.admission.revoked()).start()
        except BrokerError as e:
            log.error("elected to host the bus, but cannot start a broker on %s:%s: %s", bind, endpoint[1], e)
            return
        self.node.counters["handover.hosted"] += 1
        self._notify()
        log.warning("no configured broker answers: this node hosts the bus on %s:%s", bind, endpoint[1])

    def _retire(self) -> None:
        broker, self.broker = self.broker, None
        self._retire_at = None
        if broker is not None:
            broker.stop()
            log.warning("stopped hosting the bus")
            self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    @property
    def hosting(self) -> bool:
        return self.broker is not None

    def wait_hosting(self, hosting: bool, timeout: float) -> bool:
        """Wait until this node hosts the bus (or no longer does)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.hosting == hosting, timeout)
