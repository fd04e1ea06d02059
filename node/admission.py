"""This node's side of the swarm roster (shared/roster.py).

With `[swarm] admin` set, a node takes diffs, votes, trace and sync messages only from
senders whose admission certificate it holds (they carry it in their births and fingerprints;
the store keeps it), that have not expired, have not been revoked, and for a region inside the
certificate's region trees; everything else is rejected and counted (rejected.not-admitted,
.expired, .revoked, .outside-regions). The members of a region are the admitted nodes whose
certificates cover it. A revocation, signed by the admin key, flags the node for good: its
votes and writes stop counting, and the revocation is kept as the evidence. The node itself
writes and votes only where its own certificate allows.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from edgeswarm.shared.clock import PLAUSIBLE_WALL_MS
from edgeswarm.shared.envelope import Envelope
from edgeswarm.shared.roster import (Certificate, RosterError, broker_password, check_certificate,
                                     check_revocation, parse_admin_key)
from edgeswarm.shared.topics import parse_topic

from .config import ConfigError

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("edgeswarm.admission")

REVOKED = "revoked by the swarm admin"


class AdmissionError(ValueError):
    """This node's certificate does not let it write there."""


def _now_ms() -> int | None:
    """Wall time, or None while the clock is not set (a board without a real-time clock)."""
    now = int(time.time() * 1000)
    return now if now >= PLAUSIBLE_WALL_MS else None


class Admission:
    def __init__(self, node: Node) -> None:
        self.node = node
        config = node.config
        self.admin = parse_admin_key(config.swarm_admin) if config.swarm_admin else None
        self.own: Certificate | None = None
        self._certs: dict[str, Certificate] = {}
        if self.admin is None:
            return
        if config.certificate:
            path = config.certificate_path
            try:
                self.own = check_certificate(path.read_bytes(), self.admin)
            except OSError as e:
                raise ConfigError(f"swarm.certificate: cannot read {path}: {e.strerror}") from None
            except RosterError as e:
                raise ConfigError(f"swarm.certificate {path}: {e}") from None
            if self.own.public_key != node.identity.public_key:
                raise ConfigError(f"swarm.certificate {path} admits node {self.own.node_id}, not this node "
                                  f"({node.node_id})")
        for node_id, raw in node.store.certificates().items():
            try:
                self._certs[node_id] = check_certificate(raw, self.admin)
            except RosterError:  # (from another swarm's admin, before the configuration changed)
                pass

    def credentials(self) -> tuple[str, str] | None:
        """The broker login of an admitted node (brokers that check the roster ask for it)."""
        if self.own is None:
            return None
        return self.node.node_id, broker_password(self.node.identity, self.own.raw)

    @property
    def on(self) -> bool:
        return self.admin is not None

    def _revoked(self, node_id: str) -> bool:
        return node_id in self.node.store.flagged() and self.node.store.flag_reason(node_id) == REVOKED

    def revoked(self) -> set[str]:
        """The node ids the swarm admin revoked (what a broker this node hosts must refuse)."""
        return {n for n in self.node.store.flagged() if self.node.store.flag_reason(n) == REVOKED}

    def refuse(self, env: Envelope) -> str | None:
        """Why a signed message may not count, or None."""
        if self.admin is None:
            return None
        cert = self._certs.get(env.sender_id)
        if cert is None:
            return "not-admitted"
        if self._revoked(env.sender_id):
            return "revoked"
        if (now := _now_ms()) is not None and now > cert.expires_ms:
            return "expired"
        if env.region is not None and not cert.covers(env.region):
            return "outside-regions"
        return None

    def members(self, region: str) -> set[str]:
        """The admitted nodes (this one included) whose certificates cover the region."""
        now = _now_ms()
        certs = [*self._certs.values(), *([self.own] if self.own else [])]
        return {c.node_id for c in certs if c.covers(region) and (now is None or now <= c.expires_ms)
                and not self._revoked(c.node_id)}

    def check_own(self, region: str) -> None:
        """AdmissionError unless this node's certificate lets it write in the region."""
        if self.admin is None:
            return
        own = self.own
        if own is None:
            raise AdmissionError("this node has no admission certificate (swarm.certificate): its writes "
                                 "would be refused")
        if (now := _now_ms()) is not None and now > own.expires_ms:
            raise AdmissionError("this node's admission certificate has expired")
        if not own.covers(region):
            raise AdmissionError(f"this node's admission certificate does not cover {region!r} "
                                 f"(it covers {', '.join(own.regions)})")

    # -- messages ----------------------------------------------------------------------

    def on_presence(self, env: Envelope) -> None:
        """Keep the certificate a birth or fingerprint carries (RosterError when it is not a
        valid one for the sender)."""
        if self.admin is None or type(env.body) is not dict or "certificate" not in env.body:
            return
        raw = env.body["certificate"]
        if type(raw) is not bytes:
            raise RosterError("a birth's certificate is the signed certificate's bytes")
        cert = check_certificate(raw, self.admin)
        if cert.node_id != env.sender_id:
            raise RosterError(f"{env.sender_id} presents the certificate of {cert.node_id}")
        held = self._certs.get(cert.node_id)
        if held is None or held.raw != raw:
            self.node.store.set_certificate(cert.node_id, raw)
            self._certs[cert.node_id] = cert
            log.info("node %s admitted for %s until %d", cert.node_id, ", ".join(cert.regions), cert.expires_ms)

    def on_revoke(self, env: Envelope, topic: str) -> None:
        """A revocation on the revoked node's topic, signed by the admin key."""
        if self.admin is None:
            self.node.counters["ignored.revoke"] += 1
            return
        node_id = check_revocation(env.raw, self.admin)
        if parse_topic(topic).node_id != node_id:
            raise RosterError(f"a revocation of {node_id} on {topic}")
        if node_id == self.node.node_id:
            log.error("this node's admission has been revoked: peers refuse what it sends")
        if not self._revoked(node_id):
            self.node.exclude(node_id, REVOKED, env.raw)
