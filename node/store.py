"""A node's SQLite store (one file, WAL) through sqlite-utils.

Tables
  versions  every version of every frame: region, key, version hash, parent hash, value
            (canonical CBOR), author node id, clock, state. Nothing is ever deleted.
  frames    the current head of each frame (derived from versions, kept for O(1) reads).
  diffs     every diff envelope sent or received, as raw bytes, with its status
            (applied / pending while the parent is missing) and, for our own, whether the
            broker acknowledged it (the outbox).
  senders   per-sender replay window (highest sequence number and bitmap).
  meta      this node's own sequence counter and last clock.

All writes go through `transaction()`, one BEGIN IMMEDIATE ... COMMIT, so a node and a
short-lived CLI process may share the file and a failure never half-writes anything.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from edgeswarm.shared.envelope import canonical, strict_loads

SCHEMA_VERSION = 1


class StoreError(Exception):
    """The store file cannot be opened or used (corrupt, wrong schema, locked)."""


@dataclass(frozen=True)
class FrameVersion:
    region: str
    key: str
    version: str  # hex
    parent: str | None  # hex
    value: dict | None  # None: the frame was deleted in this version
    author: str
    hlc: int
    state: str


@dataclass(frozen=True)
class PendingDiff:
    msg_id: bytes
    envelope: bytes


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10.0,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot open store {self.path}: {e.strerror}") from None

    # -- schema ----------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise StoreError(f"store {self.path} has schema {version}; this edgeswarm reads {SCHEMA_VERSION}")
        db = self.db
        with self.transaction():
            db["versions"].create({"version": bytes, "region": str, "key": str, "parent": bytes,
                                   "value": bytes, "author": str, "hlc": int, "state": str},
                                  pk="version", not_null={"region", "key", "author", "hlc", "state"})
            db["versions"].create_index(["region", "key", "hlc"])
            db["versions"].create_index(["parent"])
            db["frames"].create({"region": str, "key": str, "head": bytes}, pk=("region", "key"))
            db["diffs"].create({"msg_id": bytes, "sender": str, "seq": int, "region": str, "key": str,
                                "version": bytes, "parent": bytes, "envelope": bytes, "status": str,
                                "published": int},
                               pk="msg_id", not_null={"sender", "seq", "envelope", "status"})
            db["diffs"].create_index(["status", "parent"])
            db["diffs"].create_index(["published"])
            db["senders"].create({"node_id": str, "public_key": bytes, "top": int, "mask": bytes,
                                  "hlc": int}, pk="node_id")
            db["meta"].create({"name": str, "value": int}, pk="name")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """One atomic write; nested calls join the outer transaction."""
        with self._lock:
            conn = self.db.conn
            if conn.in_transaction:
                yield self
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- own counters ----------------------------------------------------------------

    def meta(self, name: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", [name]).fetchone()
        return default if row is None else row[0]

    def set_meta(self, name: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", [name, value])

    def next_seq(self) -> int:
        with self.transaction():
            seq = self.meta("seq") + 1
            self.set_meta("seq", seq)
            return seq

    # -- senders ---------------------------------------------------------------------

    def sender_window(self, node_id: str) -> tuple[int, int]:
        row = self.db.execute("SELECT top, mask FROM senders WHERE node_id = ?", [node_id]).fetchone()
        return (0, 0) if row is None else (row[0], int.from_bytes(row[1], "big"))

    def set_sender_window(self, node_id: str, public_key: bytes, top: int, mask: int, hlc: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO senders (node_id, public_key, top, mask, hlc) VALUES (?, ?, ?, ?, ?)",
                        [node_id, public_key, top, mask.to_bytes(8, "big"), hlc])

    # -- versions and frames ---------------------------------------------------------

    def has_version(self, version: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM versions WHERE version = ?", [version]).fetchone() is not None

    def version_info(self, version: bytes) -> tuple[str, str, dict | None] | None:
        """(region, key, value) of a stored version, or None."""
        row = self.db.execute("SELECT region, key, value FROM versions WHERE version = ?", [version]).fetchone()
        return None if row is None else (row[0], row[1], strict_loads(row[2]))

    def add_version(self, region: str, key: str, version: bytes, parent: bytes | None,
                    value: dict | None, author: str, hlc: int, state: str = "shadow") -> bool:
        """Store a version and move the frame's head. False when it was already stored."""
        with self.transaction():
            if self.has_version(version):
                return False
            self.db.execute(
                "INSERT INTO versions (version, region, key, parent, value, author, hlc, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [version, region, key, parent, canonical(value), author, hlc, state])
            self._update_head(region, key)
            return True

    def _update_head(self, region: str, key: str) -> None:
        # Deterministic for a given set of versions: the latest leaf by (clock, hash).
        row = self.db.execute(
            """SELECT version FROM versions v WHERE region = ? AND key = ?
               AND NOT EXISTS (SELECT 1 FROM versions c WHERE c.parent = v.version)
               ORDER BY hlc DESC, version DESC LIMIT 1""", [region, key]).fetchone()
        self.db.execute("INSERT OR REPLACE INTO frames (region, key, head) VALUES (?, ?, ?)", [region, key, row[0]])

    _VERSION_COLS = "region, key, version, parent, value, author, hlc, state"

    def _frame_version(self, row: tuple) -> FrameVersion:
        region, key, version, parent, value, author, hlc, state = row
        return FrameVersion(region, key, version.hex(), _hex(parent), strict_loads(value), author, hlc, state)

    def head(self, region: str, key: str) -> FrameVersion | None:
        row = self.db.execute(
            f"""SELECT {self._VERSION_COLS} FROM versions
                WHERE version = (SELECT head FROM frames WHERE region = ? AND key = ?)""",
            [region, key]).fetchone()
        return None if row is None else self._frame_version(row)

    def history(self, region: str, key: str) -> list[FrameVersion]:
        rows = self.db.execute(
            f"SELECT {self._VERSION_COLS} FROM versions WHERE region = ? AND key = ? ORDER BY hlc, version",
            [region, key]).fetchall()
        return [self._frame_version(r) for r in rows]

    def regions(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT region FROM frames ORDER BY region")]

    def keys(self, region: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT key FROM frames WHERE region = ? ORDER BY key", [region])]

    def frame_heads(self) -> list[tuple[str, str, str]]:
        """(region, key, head version hex) of every frame."""
        return [(r, k, h.hex()) for r, k, h in self.db.execute("SELECT region, key, head FROM frames ORDER BY region, key")]

    # -- diffs -----------------------------------------------------------------------

    def add_diff(self, msg_id: bytes, sender: str, seq: int, region: str, key: str, version: bytes,
                 parent: bytes | None, envelope: bytes, status: str, published: bool = True) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO diffs (msg_id, sender, seq, region, key, version, parent, envelope, status,"
            " published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [msg_id, sender, seq, region, key, version, parent, envelope, status, int(published)])

    def set_diff_status(self, msg_id: bytes, status: str) -> None:
        self.db.execute("UPDATE diffs SET status = ? WHERE msg_id = ?", [status, msg_id])

    def pending_children(self, parent: bytes) -> list[PendingDiff]:
        rows = self.db.execute("SELECT msg_id, envelope FROM diffs WHERE status = 'pending' AND parent = ?",
                               [parent]).fetchall()
        return [PendingDiff(*r) for r in rows]

    def count_diffs(self, status: str) -> int:
        return self.db.execute("SELECT count(*) FROM diffs WHERE status = ?", [status]).fetchone()[0]

    def unpublished(self) -> list[PendingDiff]:
        rows = self.db.execute("SELECT msg_id, envelope FROM diffs WHERE published = 0 ORDER BY seq").fetchall()
        return [PendingDiff(*r) for r in rows]

    def mark_published(self, msg_id: bytes) -> None:
        with self.transaction():
            self.db.execute("UPDATE diffs SET published = 1 WHERE msg_id = ?", [msg_id])
