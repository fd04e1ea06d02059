"""Numbering anew after a store may have lost its last commits.

What a node sends carries numbers its peers remember: the sequence number of each message
(their replay windows take each once), the seq of each trace entry (two different entries
at one seq prove a rewritten history), its vote round on each frame (two votes in one
round are an equivocation) and the session of each connection (a death ends its session:
a birth of that session again is not believed, presence.py). Numbers the store forgot
would be used again for something else, and the peers would drop the node's messages as
replays, or flag it for good.

A store forgets in two ways. Restored from a snapshot (snapshot.restore), it knows none of
its old numbers. After a power cut, it loses the commits made since its last sync (the
write-ahead log is synced at each checkpoint, about once a second: store.py), while what
they sent is already with the peers. A node cannot tell a power cut from a clean
shutdown by what is on its card, but the kernel can tell a new boot: each node records the
boot it runs in (Linux's boot id) and, opening its store in a different one, numbers from
above anything the lost commits can have used before it sends anything. A crashed process
loses nothing (the kernel still holds its writes), so a restart within one boot changes no
number; where there is no boot id, every start counts as a new boot.

From the new start, the node's trace goes on after a gap (peers take it as a pruned
trace: trace.py), its vote rounds from the floor, its messages from the new seq.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# What one second of lost commits can have used at most, with a wide margin: messages and
# trace entries (a few thousand a second at most), own votes on one frame (one per write or batch).
SEQ_MARGIN = 1 << 20
ROUND_MARGIN = 1 << 16  # (rounds stop at 2**32: room for 65,536 such starts)


def boot_id() -> int | None:
    """This boot of the machine, as an integer the store keeps; None where unknown."""
    try:
        return int(BOOT_ID.read_text().strip().replace("-", "")[:15], 16)
    except (OSError, ValueError):
        return None


def start_anew(store: Store, seq: int, trace: int, round_: int) -> None:
    """From now on, number messages and sessions above `seq` (a session signs its death
    first: there are fewer), own trace entries above `trace` and own vote rounds above
    `round_` (inside the caller's transaction; never lower than before)."""
    store.set_meta("seq", max(store.meta("seq"), seq))
    store.set_meta("session", max(store.meta("session"), seq))
    store.set_meta("trace_start", max(store.meta("trace_start"), trace))
    store.set_meta("round_floor", max(store.meta("round_floor"), round_))


def after_boot(store: Store, node_id: str) -> bool:
    """Start anew if the store was last opened in another boot (see above); True if so.
    Synced before it returns: a second power cut must not take the new start with it,
    or the next one would be made from the same forgotten numbers again."""
    boot = boot_id()
    if boot is not None and store.meta("boot") == boot:
        return False
    with store.durable():
        if boot is not None and store.meta("boot") == boot:  # (another process on this store came first)
            return False
        head = store.trace_head(node_id)
        if not store.meta("seq") and head is None:  # (a new store: nothing sent, nothing to forget)
            store.set_meta("boot", boot or 0)
            return False
        start_anew(store, store.meta("seq") + SEQ_MARGIN,
                   max(store.meta("trace_start"), head[0] if head else 0) + SEQ_MARGIN,
                   max(store.meta("round_floor"), store.highest_round()) + ROUND_MARGIN)
        store.set_meta("boot", boot or 0)
    return True
