"""amqtt plugins of the embedded broker (imported by amqtt only when a broker starts)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgeswarm.shared.clock import PLAUSIBLE_WALL_MS
from edgeswarm.shared.roster import Certificate, RosterError, check_broker_login, parse_admin_key
from edgeswarm.shared.topics import ADDRESSED, NODE, PREFIX

log = logging.getLogger("edgeswarm.broker")


class OpenAccessPlugin(BaseAuthPlugin):
    """Lets every client connect, and keeps the sessions of clients that ask for one.

    amqtt's own anonymous plugin marks every client anonymous, and amqtt never keeps an
    anonymous session: a node that restarts would lose the messages sent while it was away.
    Messages are signed end to end, so the broker does not need to know who is talking;
    restricting who may connect is the job of an authenticating plugin.
    """

    async def authenticate(self, *, session: Session) -> bool:
        session.is_anonymous = False
        return True


class RosterPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """For a swarm with a roster (shared/roster.py): only admitted nodes (and the admin's
    tools) may connect; a node publishes only in the region trees of its certificate, on its
    own node topic, and on another node's topic what it addresses to it (topics.ADDRESSED),
    and subscribes to and receives only those trees and node topics."""

    @dataclass
    class Config:
        admin: str = ""  # the swarm admin's public key, hex
        revoked: list = field(default_factory=list)  # node ids revoked before this broker started

    def __init__(self, context) -> None:
        super().__init__(context)
        self._admin = parse_admin_key(self.config.admin)
        self._logins: dict[str, Certificate | None] = {}  # client id -> certificate (None: the admin)
        # node ids revoked: given at the start, and those the admin publishes a revocation of
        self._revoked: set[str] = {str(n) for n in self.config.revoked}

    async def authenticate(self, *, session: Session) -> bool:
        now = int(time.time() * 1000)
        try:
            cert = check_broker_login(session.username, session.password, self._admin,
                                      now if now >= PLAUSIBLE_WALL_MS else None)
        except RosterError as e:
            log.warning("refused client %s (user %r): %s", session.client_id, session.username, e)
            self._logins.pop(session.client_id, None)
            return False
        if cert is not None and cert.node_id in self._revoked:
            log.warning("refused client %s: node %s is revoked", session.client_id, cert.node_id)
            self._logins.pop(session.client_id, None)
            return False
        self._logins[session.client_id] = cert
        session.is_anonymous = False  # (amqtt keeps no anonymous session)
        return True

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if session is None or topic is None or session.client_id not in self._logins:
            return False
        cert = self._logins[session.client_id]
        if cert is None:  # the admin; a revocation it publishes also closes the broker to that node
            if action == Action.PUBLISH and (node_id := _revoked_by(topic)) is not None:
                self._revoked.add(node_id)
            return True
        return cert.node_id not in self._revoked and allowed(cert, topic, action)


def _revoked_by(topic: str) -> str | None:
    """The node id of a revocation topic (es/v1/node/<id>/revoke)."""
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == PREFIX and parts[2] == NODE and parts[4] == "revoke":
        return parts[3]
    return None


def allowed(cert: Certificate, topic: str, action: Action | None) -> bool:
    """A node's topic rights: its own node topic, what it addresses to another node on that
    node's topic, and its certificate's region trees (also reading other nodes' topics:
    births, trace heads...)."""
    parts = topic.split("/", 3)
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return False
    if parts[2] == NODE:
        node_id, _, kind = parts[3].partition("/")
        return action != Action.PUBLISH or node_id == cert.node_id or kind in ADDRESSED
    region = parts[3].removesuffix("/#")
    return "+" not in region and "#" not in region and cert.covers(region)
