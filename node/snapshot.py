"""Snapshots: a node's consensus state in one signed file, to recover or bootstrap from.

A snapshot is a signed envelope of kind `snapshot` (the wire format of messages, in a file)
whose body holds, for every frame with a consensus, that version: region, key, hash,
parents, value, author, generation, clock; the trace heads the node knows; and each
voter's highest vote round it holds (`rounds`). Every version hash is checked again when a
snapshot is restored, so a snapshot can only say which versions the signer held as
consensus, not invent their content.

`write` keeps the last `keep` snapshots in <home>/recovery. `restore` builds a node's
store from a snapshot (its own, or a peer's for a new or wiped board); an existing store
file is moved aside first, never deleted. Peers then bring the rest by anti-entropy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgeswarm.shared import diff
from edgeswarm.shared.envelope import EnvelopeError, decode
from edgeswarm.shared.identity import Identity, IdentityError

from . import restart
from .bodies import MAX_ROUND
from .config import Config
from .store import Frame, Store

if TYPE_CHECKING:
    from .node import Node

RECOVERY_DIR = "recovery"
ROUND_EPOCH = 1_704_067_200  # 2024-01-01 UTC
MAX_SNAPSHOT_BYTES = 1 << 30


class SnapshotError(Exception):
    """A snapshot that cannot be written, read or trusted."""


def write(node: Node, keep: int = 5) -> Path:
    store = node.store
    frames = []
    for region, key, version, parents, value, author, gen, hlc in store.consensus_versions():
        frames.append([region, key, version, list(parents), value, author, gen, hlc])
    traces = {node_id: list(head) for node_id in store.traced_nodes() if (head := store.trace_head(node_id))}
    env = node.sign("snapshot", None, {"node": node.node_id, "frames": frames, "traces": traces,
                                       "rounds": store.highest_rounds()})
    folder = node.config.home / RECOVERY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"snapshot-{env.hlc:020d}.cbor"
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(env.raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # (a full disk: a part written is space lost, and the next one would leave another)
        tmp.unlink(missing_ok=True)
        raise
    for old in sorted(folder.glob("snapshot-*.cbor"))[:-keep]:
        old.unlink()
    node.counters["snapshots"] += 1
    return path


def latest(home: Path) -> Path | None:
    files = sorted((Path(home) / RECOVERY_DIR).glob("snapshot-*.cbor"))
    return files[-1] if files else None


def round_floor(now: float | None = None) -> int:
    """Where a restored node's vote rounds start at least: a quarter-second count since
    2024, above any round it can have reached before unless a frame had more than four
    votes of it a second since its last restore, and below MAX_ROUND until 2058. The
    snapshot lifts it above the highest round of the node that its signer held (with room
    for what followed: restart.ROUND_MARGIN), which covers such a frame too."""
    return int(((time.time() if now is None else now) - ROUND_EPOCH) * 4)


def _held_round(body: dict, config: Config) -> int:
    """The highest vote round of the restored node the snapshot's signer held (0: none
    said, or a board with no key yet, which has voted nothing)."""
    try:
        node_id = Identity.load(config.key_path).node_id
    except IdentityError:
        return 0
    rounds = body.get("rounds")
    held = rounds.get(node_id) if type(rounds) is dict else None
    return held if type(held) is int and 0 <= held <= MAX_ROUND else 0


def restore(config: Config, path: Path, trusted: set[str] | None = None) -> dict:
    """Build the store of `config` from the snapshot at `path`. Returns what was restored."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {path}: {e.strerror}") from None
    try:
        env = decode(raw, max_bytes=MAX_SNAPSHOT_BYTES)
    except EnvelopeError as e:
        raise SnapshotError(f"{path} is not a valid snapshot: {e}") from None
    body = env.body
    if env.kind != "snapshot" or type(body) is not dict or type(body.get("frames")) is not list:
        raise SnapshotError(f"{path} is not a snapshot")
    if trusted and env.sender_id not in trusted:
        raise SnapshotError(f"snapshot {path} is signed by {env.sender_id}, who is not a member")
    rows = []
    for item in body["frames"]:
        try:
            region, key, version, parents, value, author, gen, hlc = item
            parents = tuple(parents)
            expected = (diff.merge_hash(region, key, list(parents), value) if len(parents) > 1
                        else diff.version_hash(region, key, parents[0] if parents else None, value))
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"{path}: a malformed frame entry ({e})") from None
        if expected != version:
            raise SnapshotError(f"{path}: version {version.hex()[:16]} of {region}/{key} does not match its value")
        rows.append((region, key, version, parents, value, author, gen, hlc))

    store_path = config.store_path
    moved = None
    if store_path.exists():
        moved = store_path.with_name(f"{store_path.name}.before-restore-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{store_path}{suffix}")
            if src.exists():
                src.rename(f"{moved}{suffix}")
    store = Store(store_path)
    try:
        with store.transaction():
            for region, key, version, parents, value, author, gen, hlc in rows:
                store.add_version(region, key, version, parents, value, author, hlc, gen)
                store.set_frame(region, key, Frame(version, version, 0, settled=True))
            store.set_states({row[2]: "consensus" for row in rows})
            # A restored board may have sent messages, trace entries and votes before with
            # this key, which its peers remember (restart.py): it numbers them from above
            # anything plausible, the snapshot's clock and a round floor from the time, or
            # above its rounds the snapshot holds.
            held = _held_round(body, config)
            restart.start_anew(store, env.hlc, env.hlc,
                               max(round_floor(), held + restart.ROUND_MARGIN if held else 0))
            store.set_meta("hlc", max(store.meta("hlc"), env.hlc))
    finally:
        store.close()
    return {"frames": len(rows), "signer": env.sender_id, "moved_aside": str(moved) if moved else None}

