"""amqtt plugins of the embedded broker (imported by amqtt only when a broker starts)."""

from __future__ import annotations

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


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
