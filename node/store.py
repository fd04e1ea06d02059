"""A node's SQLite store (one file, WAL) through sqlite-utils.

Tables
  versions  every version of every frame: region, key, version hash, parent hash (or, for
            a merge, the sorted parents), value (canonical CBOR), author node id (empty for
            a merge), clock, generation, coherence verdict and state. Nothing is deleted.
  frames    per frame: the local head (fork choice), the consensus version, this node's
            vote round. Derived from versions and votes, kept for O(1) reads.
  diffs     every diff envelope sent or received, raw, with its status
            (applied / pending while a parent is missing / rejected).
  votes     the votes: (region, key, round, voter) -> version, with the signed envelope
            (what anti-entropy sends) or, for the vote its author's diff carries, the
            diff's message id (32 bytes: the diffs table holds that envelope once, and a
            change's rows take one page less); those no decision reads again go at each
            scheduled round (Voting.compact_votes);
  latest    and each voter's highest round per frame.
  sums      per frame, what anti-entropy compares (node/digest.py): its position, the XOR of
            its item hashes (authored versions, latest votes), how many authored versions
            and the sum of the latest vote rounds. Kept with every version and vote.
  trace     hash-chained signed entries: this node's own log and the copies fetched of peers'.
  flagged   nodes caught voting twice in one round, with both signed votes as evidence, and
            nodes the swarm admin revoked, with the signed revocation.
  certificates  the admission certificates peers presented (swarm roster).
  outbox    this node's own envelopes until the broker acknowledges them, by sequence
            number (the rows one change adds and drops lie together: no index of random
            message ids to touch, schema 7).
  senders   replay windows (highest sequence number and bitmap): one per sender and topic
            for live traffic ("<node id>/<kind>/<region>"), one per sender for what rounds
            bring, handled later ("<node id>/round").
  meta      this node's own sequence counter and last clock.

All writes go through `transaction()`, one BEGIN IMMEDIATE ... COMMIT, so a node and a
short-lived CLI process may share the file and a failure never half-writes anything.

Inside a transaction the store keeps what it reads again and again (replay windows, flagged
nodes, frame rows, latest votes, voters, trace heads, frames with nothing waiting, its own
counters, the values of the versions written or read last) and writes replay windows, frame
rows, latest votes, counters and sums once each, at COMMIT (a relay's eighteen votes: one
statement for their latest rows, not eighteen).
The cache outlives the transaction only while no other connection commits (PRAGMA
data_version) and is dropped on ROLLBACK; reads outside a transaction always go to the file.
Indexes cover only the rows looked up through them (merges, diffs waiting for a parent):
each index a row enters is one more page for its COMMIT to write.

A running node copies the write-ahead log back into the file from a thread of its own
(`checkpoint_in_background`, every CHECKPOINT_EVERY seconds) rather than in whichever COMMIT
crosses SQLite's 1,000-page mark: that checkpoint syncs the files to disk while the write
waits (bench_store: a lone node's put p99 6.4 ms with it, 0.9 ms without; slower on an SD
card). The log is synced at each checkpoint, so a power cut loses at most about the last
second of commits (synchronous=NORMAL); a crashed process loses none.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import reduce
from itertools import islice
from operator import xor
from pathlib import Path
from typing import NamedTuple, TypeVar

import sqlite_utils

from edgeswarm.shared.diff import HASH_BYTES
from edgeswarm.shared.envelope import canonical, strict_loads

from .digest import position, version_item, vote_item

T = TypeVar("T")
log = logging.getLogger("edgeswarm.node")

SCHEMA_VERSION = 7
CACHED_FRAMES = 4096  # frames (and senders) whose rows are kept between transactions
CACHED_VALUES = 1024  # versions whose values are kept (version_info)
# A COMMIT appends every page it changed to the log, and most change a few rows in each of a
# dozen tables: smaller pages write fewer bytes. bench/bench_store.py, a member of a
# 20-member swarm, written to storage per change (schema 5): ~242 KiB with 4,096-byte pages,
# ~170 with 2,048, ~123 with 1,024 (and 6-10 % more CPU); 2,048 costs no more CPU (within
# noise) and ~10 % more file. Batches write about the same with either. (Schema 6, votes by
# round: ~96 KiB with 2,048.)
PAGE_SIZE = 2048

_SUM_UPSERT = ("INSERT INTO sums (region, key, pos, hash, versions, rounds) VALUES (?, ?, ?, ?, ?, ?)"
               " ON CONFLICT (region, key) DO UPDATE SET hash = (hash | excluded.hash) & ~(hash & excluded.hash),"
               " versions = versions + excluded.versions, rounds = rounds + excluded.rounds")
# (Rows are updated in place, not replaced: a replaced row moves, so COMMIT writes its index page too.)
_LATEST_UPSERT = ("INSERT INTO latest (region, key, voter, round, version) VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                  " (region, key, voter) DO UPDATE SET round = excluded.round, version = excluded.version")
# A vote's envelope as stored: the vote's own, or the diff's it came in (see votes above)
_VOTE_ENVELOPE = ("CASE WHEN length(envelope) = 32"
                  " THEN (SELECT d.envelope FROM diffs d WHERE d.msg_id = votes.envelope) ELSE envelope END")
_META_UPSERT = "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value"
_FRAME_UPSERT = ("INSERT INTO frames (region, key, head, consensus, round, settled) VALUES (?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT (region, key) DO UPDATE SET head = excluded.head, consensus = excluded.consensus,"
                 " round = excluded.round, settled = excluded.settled")
_SENDER_UPSERT = ("INSERT INTO senders (node_id, public_key, top, mask, hlc) VALUES (?, ?, ?, ?, ?)"
                  " ON CONFLICT (node_id) DO UPDATE SET public_key = excluded.public_key, top = excluded.top,"
                  " mask = excluded.mask, hlc = excluded.hlc")
CHECKPOINT_EVERY = 1.0  # seconds between a running node's write-ahead log checkpoints
COMPACT_QUEUE = 65536  # frames decided since their votes were compacted (more wait for their next decision)


class StoreError(Exception):
    """The store file cannot be opened or used (corrupt, wrong schema, locked)."""


class StoreFullError(StoreError):
    """A write found no room on the store's disk: nothing of it was written."""


@dataclass(frozen=True)
class FrameVersion:
    region: str
    key: str
    version: str  # hex
    parents: tuple[str, ...]  # hex; two or more for a merge
    value: dict | None  # None: the frame was deleted in this version
    author: str  # node id; "" for a merge every node computes
    hlc: int
    state: str  # shadow, consensus, fork, rejected, superseded

    @property
    def parent(self) -> str | None:
        return self.parents[0] if len(self.parents) == 1 else None


class VersionInfo(NamedTuple):
    """A stored version's frame, value, generation and parents (sorted)."""
    region: str
    key: str
    value: dict | None
    gen: int
    parents: tuple[bytes, ...]


class VersionMeta(NamedTuple):
    """What the voter needs to know about a version (no value). A tuple: frames are
    reloaded for every decision, so this is built often."""
    version: bytes
    parents: tuple[bytes, ...]
    author: str
    gen: int
    hlc: int
    coherent: bool
    state: str = "shadow"

    @property
    def is_merge(self) -> bool:
        return len(self.parents) > 1


@dataclass(frozen=True)
class Queued:
    msg_id: bytes
    topic: str
    envelope: bytes
    seq: int = 0


class Out(NamedTuple):
    """A message a committed transaction publishes: one of this node's, or a batch of them,
    carrying the outbox rows `seqs` (the messages `ids`)."""
    topic: str
    kind: str
    region: str | None
    raw: bytes
    seqs: tuple[int, ...]
    ids: tuple[bytes, ...]


@dataclass(frozen=True)
class Frame:
    head: bytes | None
    consensus: bytes | None
    round: int
    # Every version older (by generation) than the consensus is one of its ancestors, so
    # decisions need only the consensus and what descends from it.
    settled: bool = False


def _disk_full(e: BaseException) -> bool:
    """An SQLite error that says the disk (or the database's page limit) is full."""
    return isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def split_hashes(blob: bytes | None) -> tuple[bytes, ...]:
    if not blob:
        return ()
    return tuple(blob[i:i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES))


def _parents(parent: bytes | None, merge_of: bytes | None) -> tuple[bytes, ...]:
    return split_hashes(merge_of) if merge_of else ((parent,) if parent else ())


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        # Anti-entropy keeps its digest trees in memory: every committed change to `sums` is
        # handed to these listeners as (generation, [(region, position, item, versions,
        # rounds), ...]), or (generation, None) when the table was rebuilt.
        self.sum_listeners: list[Callable[[int, list | None], None]] = []
        # Told, under the store's lock, how each outermost transaction ended: True once it
        # committed, False once it was rolled back (or its COMMIT failed).
        self.end_listeners: list[Callable[[bool], None]] = []
        # called in each transaction as it is about to commit (what they write commits with it)
        self.commit_listeners: list[Callable[[], None]] = []
        self.sums_gen = 0
        self._sum_changes: list | None = []
        # Frames decided since their votes were last compacted (decided_frames), oldest
        # first; at most COMPACT_QUEUE of them.
        self._to_compact: dict[tuple[str, str], None] = {}
        self._tx = False  # a transaction is open: the cache may be read
        self._tx_thread: int | None = None  # the thread that holds it
        self._joined = nullcontext(self)
        self._data_version = -1
        self._checkpointer: tuple[threading.Thread, threading.Event] | None = None
        self._forget()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10.0,
                                   isolation_level=None)
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # (a new file's; an existing one keeps its own)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open store {self.path}: {e} (`edgeswarm restore` rebuilds it from the last "
                             "snapshot and keeps this file)") from None
        except OSError as e:
            raise StoreError(f"cannot open store {self.path}: {e.strerror}") from None

    # -- schema ----------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version not in range(SCHEMA_VERSION):
            raise StoreError(f"store {self.path} has schema {version}; this edgeswarm reads {SCHEMA_VERSION}")
        if version:
            with self.transaction():  # each step brings the schema one version on, all in one go
                if version == 1:
                    self.db["diffs"].create_index(["version"], if_not_exists=True)
                    # Acknowledged envelopes used to stay in the outbox (a second copy of each).
                    self._exec("DELETE FROM outbox WHERE acked = 1")
                    self._exec("DROP INDEX IF EXISTS idx_outbox_acked_seq")
                    self.db["outbox"].transform(drop={"acked"})
                    self.db["outbox"].create_index(["seq"], if_not_exists=True)
                    self.rebuild_sums()
                if version <= 2:
                    self._create_certificates()
                if version <= 4:
                    self._partial_indexes()
                if version <= 5:
                    self._rebuild_votes()
                # (7: the vote a diff carries is kept as the diff's message id; the votes of
                # earlier stores keep their envelopes and read as before. Schema 6 releases
                # would send those ids for envelopes: they refuse a store of 7 instead.)
                if version <= 6:
                    self._rebuild_outbox()  # (5: in sequence order; 7: by sequence number alone)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return
        db = self.db
        with self.transaction():
            db["versions"].create({"version": bytes, "region": str, "key": str, "parent": bytes,
                                   "merge_of": bytes, "value": bytes, "author": str, "hlc": int,
                                   "gen": int, "coherent": int, "reason": str, "state": str},
                                  pk="version", not_null={"region", "key", "author", "hlc", "gen", "state"})
            db["versions"].create_index(["region", "key", "gen"])
            db["frames"].create({"region": str, "key": str, "head": bytes, "consensus": bytes, "round": int,
                                 "settled": int},
                                pk=("region", "key"))
            db["diffs"].create({"msg_id": bytes, "sender": str, "seq": int, "region": str, "key": str,
                                "version": bytes, "parent": bytes, "envelope": bytes, "status": str},
                               pk="msg_id", not_null={"sender", "seq", "envelope", "status"})
            db["diffs"].create_index(["version"])
            self._create_votes()
            db["trace"].create({"node_id": str, "seq": int, "hash": bytes, "prev": bytes, "entry": bytes,
                                "sig": bytes}, pk=("node_id", "seq"))
            db["peers"].create({"node_id": str, "session": int, "birth_hlc": int, "death_hlc": int, "alive": int,
                                "regions": bytes, "software": str, "fingerprint": bytes, "fingerprint_hlc": int},
                               pk="node_id")
            db["flagged"].create({"node_id": str, "reason": str, "evidence_a": bytes, "evidence_b": bytes},
                                 pk="node_id")
            self._create_outbox()
            db["senders"].create({"node_id": str, "public_key": bytes, "top": int, "mask": bytes,
                                  "hlc": int}, pk="node_id")
            db["meta"].create({"name": str, "value": int}, pk="name")
            self._create_certificates()
            self._partial_indexes()
            self.rebuild_sums()
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _partial_indexes(self) -> None:
        """Indexes of the few rows looked up by them (merges; diffs waiting for a parent): a
        version or diff that is neither adds nothing to them, and a COMMIT writes one page
        fewer for each (schema 5; before, they indexed every row)."""
        self._exec("DROP INDEX IF EXISTS idx_versions_merge_of")
        self._exec("DROP INDEX IF EXISTS idx_diffs_status_region_key")
        self._exec("CREATE INDEX IF NOT EXISTS idx_versions_merges ON versions (merge_of) WHERE merge_of IS NOT NULL")
        self._exec("CREATE INDEX IF NOT EXISTS idx_diffs_pending ON diffs (region, key) WHERE status = 'pending'")

    def _create_outbox(self) -> None:
        # Rows in sequence order (an insert writes the last page, and acknowledged rows go
        # from the first ones), found by sequence number too: one tree, no index of ids.
        self._exec("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, msg_id BLOB NOT NULL, topic TEXT NOT NULL,"
                   " envelope BLOB NOT NULL)")

    def _rebuild_outbox(self) -> None:
        """(schemas 5 and 7) The outbox in sequence order, with what it holds."""
        self._exec("ALTER TABLE outbox RENAME TO outbox_4")
        self._exec("DROP INDEX IF EXISTS idx_outbox_seq")
        self._create_outbox()
        self._exec("INSERT OR IGNORE INTO outbox (seq, msg_id, topic, envelope)"
                   " SELECT seq, msg_id, topic, envelope FROM outbox_4")
        self._exec("DROP TABLE outbox_4")

    def rebuild_sums(self) -> None:
        """(Re)create the sums table from what the store holds: empty for a new store,
        computed once for a store of schema 1."""
        with self.transaction():
            self._sum_changes = None  # (not item by item: listeners start again from the table)
            self._pending_sums = {}  # (what they held is in the tables read below)
            self._flush_latest()
            self._exec("DROP TABLE IF EXISTS sums")
            self.db["sums"].create({"region": str, "key": str, "pos": int, "hash": int, "versions": int,
                                    "rounds": int}, pk=("region", "key"))
            self.db["sums"].create_index(["pos"])
            for region, key, version in self._exec("SELECT region, key, version FROM versions WHERE author != ''"):
                self._add_sum(region, key, version_item(version), 1, 0)
            for region, key, voter, round_, version in self._exec(
                    "SELECT region, key, voter, round, version FROM latest"):
                self._add_sum(region, key, vote_item(voter, round_, version), 0, round_)

    def _create_votes(self) -> None:
        # Rows in key order, with no second index to write: a frame's votes by round, then
        # voter. The members vote on a new version each in its next round, mostly the same:
        # its votes land side by side, on a page or two, where by voter first they went to as
        # many places as there are voters (bench/bench_store.py, a member of a 20-member
        # swarm: 43 pages appended to the write-ahead log per change instead of 80), and the
        # rounds the scheduled compaction drops free whole pages.
        self._exec("CREATE TABLE votes (region TEXT NOT NULL, key TEXT NOT NULL, voter TEXT NOT NULL,"
                   " round INTEGER NOT NULL, version BLOB NOT NULL, merge_of BLOB, envelope BLOB,"
                   " PRIMARY KEY (region, key, round, voter)) WITHOUT ROWID")
        self._exec("CREATE INDEX idx_votes_merges ON votes (region, key) WHERE merge_of IS NOT NULL")
        self._exec("CREATE TABLE latest (region TEXT NOT NULL, key TEXT NOT NULL, voter TEXT NOT NULL,"
                   " round INTEGER NOT NULL, version BLOB NOT NULL, PRIMARY KEY (region, key, voter)) WITHOUT ROWID")

    def _rebuild_votes(self) -> None:
        """The vote tables rebuilt in key order (WITHOUT ROWID: schema 4; a frame's votes by
        round, then voter: schema 6)."""
        self._exec("ALTER TABLE votes RENAME TO votes_old")
        self._exec("ALTER TABLE latest RENAME TO latest_old")
        for index in ("idx_votes_region_key_merge_of", "idx_votes_merges"):  # (renamed with their table)
            self._exec(f"DROP INDEX IF EXISTS {index}")
        self._create_votes()
        self._exec("INSERT INTO votes (region, key, voter, round, version, merge_of, envelope)"
                   " SELECT region, key, voter, round, version, merge_of, envelope FROM votes_old"
                   " ORDER BY region, key, round, voter")
        self._exec("INSERT INTO latest SELECT region, key, voter, round, version FROM latest_old"
                   " ORDER BY region, key, voter")
        self._exec("DROP TABLE votes_old")
        self._exec("DROP TABLE latest_old")

    def _create_certificates(self) -> None:
        self.db["certificates"].create({"node_id": str, "certificate": bytes}, pk="node_id", if_not_exists=True)

    def _add_sum(self, region: str, key: str, item: int, versions: int, rounds: int) -> None:
        """XOR an item hash into a frame's sum (SQLite has no XOR operator: a|b & ~(a&b));
        in a transaction, once per frame at COMMIT."""
        pending = self._pending_sums.get((region, key)) if self._tx else None
        pos = position(region, key) if pending is None else pending[0]
        if self._sum_changes is not None:
            self._sum_changes.append((region, pos, item, versions, rounds))
        if pending is not None:
            pending[1] ^= item
            pending[2] += versions
            pending[3] += rounds
        elif self._tx:
            self._pending_sums[(region, key)] = [pos, item, versions, rounds]
        else:
            self._exec(_SUM_UPSERT, [region, key, pos, item, versions, rounds])

    # -- transactions ----------------------------------------------------------------

    def busy(self) -> bool:
        """Whether another thread holds the store now (for a thread that would rather not
        wait for it, such as the network thread)."""
        if not self._lock.acquire(blocking=False):
            return True
        self._lock.release()
        return False

    def transaction(self) -> AbstractContextManager[Store]:
        """One atomic write; nested calls join the outer transaction. (The thread that holds
        it joins for nothing: a write and what it signs and stores nest about sixteen.)"""
        if self._tx_thread == threading.get_ident():  # (no other thread ever reads its own id here)
            return self._joined
        return self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[Store]:
        with self._lock:
            conn = self.db.conn
            if conn.in_transaction:
                yield self
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._begin()
                self._tx_thread = threading.get_ident()
                yield self
                for listener in self.commit_listeners:
                    listener()
                self._flush()
                self._tx, self._tx_thread = False, None
                conn.execute("COMMIT")
            except BaseException as e:
                self._tx, self._tx_thread = False, None
                self._forget()
                self._roll_back()  # (after a failed COMMIT too: else the next transaction would join this one)
                self._sum_changes = []
                self._ended(False)
                if _disk_full(e):
                    raise self._full() from e
                raise
            self._ended(True)
            changes, self._sum_changes = self._sum_changes, []
            if changes != []:
                self.sums_gen += 1
                for listener in self.sum_listeners:
                    listener(self.sums_gen, changes)

    def _ended(self, committed: bool) -> None:
        for listener in self.end_listeners:
            listener(committed)

    def _roll_back(self) -> None:
        """(Under the lock.) Undo the open transaction, if SQLite has not already: it does
        itself on some errors — a full disk, an I/O error — and ROLLBACK then fails."""
        if self.db.conn.in_transaction:
            self.db.conn.execute("ROLLBACK")

    def _full(self) -> StoreFullError:
        return StoreFullError(f"the disk of store {self.path} is full ({self.free_bytes():,} bytes free): nothing "
                              "of this change was written; free space there (firmware-notes: sizing the card)")

    def free_bytes(self) -> int:
        """Bytes free to this node on the filesystem that holds the store (-1: unknown)."""
        try:
            return shutil.disk_usage(self.path.parent).free
        except OSError:
            return -1

    def _begin(self) -> None:
        """Keep the cache only if no other connection committed since it was filled."""
        version = self.db.conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version or max(len(self._frames), len(self._gens), len(self._latest),
                                                 len(self._idle), len(self._senders),
                                                 len(self._trace_heads)) > CACHED_FRAMES:
            self._forget()
            self._data_version = version
        self._tx = True

    def _forget(self) -> None:
        self._senders: dict[str, tuple[int, int]] = {}
        self._flagged: frozenset[str] | None = None
        self._frames: dict[tuple[str, str], Frame | None] = {}
        self._gens: dict[bytes, int] = {}  # version -> generation, of versions held
        self._values: dict[bytes, VersionInfo] = {}  # (version_info: the latest CACHED_VALUES)
        self._latest: dict[tuple[str, str], dict[str, tuple[int, bytes]]] = {}
        self._voters: dict[str, set[str]] = {}
        self._idle: set[tuple[str, str]] = set()  # frames with no pending diff and no voted merge lacking
        self._trace_heads: dict[str, tuple[int, bytes] | None] = {}
        self._pending_senders: dict[str, tuple[bytes, int, bytes, int]] = {}
        self._pending_sums: dict[tuple[str, str], list[int]] = {}
        self._meta: dict[str, int] = {}  # (meta rows read or written: a transaction signs messages)
        self._pending_meta: dict[str, int] = {}
        self._pending_frames: dict[tuple[str, str], Frame] = {}
        self._pending_latest: dict[tuple[str, str, str], tuple[int, bytes]] = {}

    def _flush(self) -> None:
        """Write what the transaction kept for COMMIT."""
        self._flush_frames()
        self._flush_latest()
        if self._pending_senders:
            self.db.conn.executemany(_SENDER_UPSERT, [(n, *row) for n, row in self._pending_senders.items()])
            self._pending_senders = {}
        if self._pending_meta:
            self.db.conn.executemany(_META_UPSERT, list(self._pending_meta.items()))
            self._pending_meta = {}
        self._flush_sums()

    def _flush_frames(self) -> None:
        """(Under the lock.) Write the frames the transaction changed: at COMMIT, and before a
        query reads the table (a batch changes a frame several times: written once)."""
        if self._pending_frames:
            self.db.conn.executemany(_FRAME_UPSERT, [(r, k, f.head, f.consensus, f.round, int(f.settled))
                                                     for (r, k), f in self._pending_frames.items()])
            self._pending_frames = {}

    def _flush_latest(self) -> None:
        """(Under the lock.) Write the voters' latest votes the transaction changed: at
        COMMIT, and before a query reads the table (a relay brings many: one statement)."""
        if self._pending_latest:
            self.db.conn.executemany(_LATEST_UPSERT, [(*frame_voter, *row)
                                                      for frame_voter, row in self._pending_latest.items()])
            self._pending_latest = {}

    def _frames_query(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        """All rows of a query that reads the frames table, the frames the open transaction
        changed written first."""
        with self._lock:
            self._flush_frames()
            return self._exec(sql, params)

    def _flush_sums(self) -> None:
        if self._pending_sums:
            self.db.conn.executemany(_SUM_UPSERT, [(r, k, *sums) for (r, k), sums in self._pending_sums.items()])
            self._pending_sums = {}

    @contextmanager
    def durable(self) -> Iterator[Store]:
        """A transaction synced to disk as it commits (synchronous=FULL for it alone)."""
        with self._lock:
            if self.db.conn.in_transaction:
                raise RuntimeError("a durable transaction cannot join another")
            self.db.conn.execute("PRAGMA synchronous=FULL")
            try:
                with self.transaction():
                    yield self
            finally:
                self.db.conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        self.stop_checkpoints()
        with self._lock:
            self.db.conn.close()

    def checkpoint_in_background(self, every: float = CHECKPOINT_EVERY) -> None:
        """From now on, checkpoint the write-ahead log every `every` seconds from a thread with
        a connection of its own, and never in a COMMIT (see the module's notes)."""
        if self._checkpointer is not None:
            return
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        stop = threading.Event()
        thread = threading.Thread(target=self._checkpoints, args=(conn, stop, every), daemon=True,
                                  name=f"edgeswarm-checkpoint-{self.path.parent.name}")
        with self._lock:
            self.db.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = thread, stop
        thread.start()

    def stop_checkpoints(self) -> None:
        """Back to checkpoints in COMMIT, after a last one from the thread."""
        if self._checkpointer is None:
            return
        thread, stop = self._checkpointer
        self._checkpointer = None
        stop.set()
        thread.join()
        with self._lock:
            self.db.conn.execute("PRAGMA wal_autocheckpoint=1000")

    @staticmethod
    def _checkpoints(conn: sqlite3.Connection, stop: threading.Event, every: float) -> None:
        try:
            while True:
                stopping = stop.wait(every)
                try:
                    # PASSIVE: copies what no reader still needs, never waits for a writer
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:
                    log.warning("write-ahead log checkpoint failed: %s", e)
                if stopping:
                    return
        finally:
            conn.close()

    def _exec(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        """Run one statement under the store lock and return all its rows. The connection is
        shared by the API's threads and the network thread: a read must never see another
        thread's transaction half done."""
        with self._lock:
            return self.db.conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: list) -> tuple | None:
        rows = self._exec(sql, params)
        return rows[0] if rows else None

    # -- own counters ----------------------------------------------------------------

    def meta(self, name: str, default: int = 0) -> int:
        with self._lock:
            if self._tx and name in self._meta:
                return self._meta[name]
            row = self._one("SELECT value FROM meta WHERE name = ?", [name])
            if row is not None and self._tx:
                self._meta[name] = row[0]
            return default if row is None else row[0]

    def set_meta(self, name: str, value: int) -> None:
        """(In a transaction, written once at COMMIT: a batch of writes signs hundreds of messages.)"""
        with self._lock:
            if self._tx:
                self._pending_meta[name] = self._meta[name] = value
            else:
                self._meta.pop(name, None)
                self._exec(_META_UPSERT, [name, value])

    def highest_round(self) -> int:
        """This node's highest vote round on any frame."""
        return self._frames_query("SELECT MAX(round) FROM frames")[0][0] or 0

    def highest_rounds(self) -> dict[str, int]:
        """Each voter's highest vote round on any frame, of the latest votes held."""
        with self._lock:
            self._flush_latest()
            return dict(self._exec("SELECT voter, MAX(round) FROM latest GROUP BY voter"))

    def next_seq(self) -> int:
        with self.transaction():
            seq = self.meta("seq") + 1
            self.set_meta("seq", seq)
            return seq

    # -- senders ---------------------------------------------------------------------

    def sender_window(self, node_id: str) -> tuple[int, int]:
        with self._lock:
            window = self._senders.get(node_id) if self._tx else None
            if window is None:
                row = self._one("SELECT top, mask FROM senders WHERE node_id = ?", [node_id])
                window = (0, 0) if row is None else (row[0], int.from_bytes(row[1], "big"))
                if self._tx:
                    self._senders[node_id] = window
            return window

    def set_sender_window(self, node_id: str, public_key: bytes, top: int, mask: int, hlc: int) -> None:
        row = (public_key, top, mask.to_bytes(8, "big"), hlc)
        with self._lock:
            self._senders[node_id] = (top, mask)
            if self._tx:
                self._pending_senders[node_id] = row
            else:
                self._exec(_SENDER_UPSERT, [node_id, *row])

    def voters(self, region: str) -> list[str]:
        """The nodes that have voted on any frame of a region."""
        with self._lock:
            voters = self._voters.get(region) if self._tx else None
            if voters is None:
                self._flush_latest()
                voters = {r[0] for r in self._exec("SELECT DISTINCT voter FROM latest WHERE region = ?", [region])}
                if self._tx:
                    self._voters[region] = voters
            return list(voters)

    # -- versions --------------------------------------------------------------------

    def has_version(self, version: bytes) -> bool:
        with self._lock:
            if self._tx and version in self._gens:
                return True
            return self._one("SELECT 1 FROM versions WHERE version = ?", [version]) is not None

    def versions_named(self, region: str, key: str, prefix: bytes) -> list[bytes]:
        """The versions of a frame held whose hash starts with `prefix`, two at most
        (shared/shortening.py); found through the versions' own index."""
        if not prefix:
            return []
        with self._lock:
            return [r[0] for r in self._exec("SELECT version FROM versions WHERE version BETWEEN ? AND ?"
                                             " AND region = ? AND key = ? LIMIT 2",
                                             [prefix, prefix + b"\xff" * 32, region, key])]

    def _gen(self, version: bytes) -> int | None:
        """(Under the lock, in a transaction.) The generation of a version held."""
        gen = self._gens.get(version)
        if gen is None:
            row = self._one("SELECT gen FROM versions WHERE version = ?", [version])
            if row is not None:
                gen = self._gens[version] = row[0]
        return gen

    def version_info(self, version: bytes) -> VersionInfo | None:
        """(region, key, value, generation, parents) of a stored version, or None. In a
        transaction, from the versions this store wrote or read lately (a write reads its
        parent's value, mostly the one written before it): the value is then shared, and
        is never to be changed."""
        with self._lock:
            if self._tx and (info := self._values.get(version)) is not None:
                return info
            row = self._one("SELECT region, key, value, gen, parent, merge_of FROM versions WHERE version = ?",
                            [version])
            if row is None:
                return None
            info = VersionInfo(row[0], row[1], strict_loads(row[2]), row[3], _parents(row[4], row[5]))
            if self._tx:
                self._keep_value(version, info)
            return info

    def _keep_value(self, version: bytes, info: VersionInfo) -> None:
        """(Under the lock, in a transaction.)"""
        values = self._values
        values[version] = info
        if len(values) > CACHED_VALUES:
            del values[next(iter(values))]

    def add_version(self, region: str, key: str, version: bytes, parents: tuple[bytes, ...],
                    value: dict | None, author: str, hlc: int, gen: int,
                    coherent: bool = True, reason: str | None = None, encoded: bytes | None = None) -> bool:
        """Store a version (its value's canonical CBOR `encoded`, when the caller has it).
        False when it was already stored. The value is kept for version_info: it is never to
        be changed afterwards."""
        with self.transaction():
            merge = len(parents) > 1
            if not self.db.conn.execute(
                    "INSERT INTO versions (version, region, key, parent, merge_of, value, author, hlc, gen, coherent,"
                    " reason, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (version) DO NOTHING",
                    [version, region, key, None if merge or not parents else parents[0],
                     b"".join(sorted(parents)) if merge else None, canonical(value) if encoded is None else encoded,
                     author, hlc, gen, int(coherent), reason, "shadow" if coherent else "rejected"]).rowcount:
                return False
            self._keep_value(version, VersionInfo(region, key, value, gen, tuple(sorted(parents))))
            if author:
                self._add_sum(region, key, version_item(version), 1, 0)
            # A version older than the consensus does not descend from it: the frame's
            # history below the consensus is no longer all settled.
            frame = self._frames.get((region, key), True) if self._tx else True
            if frame is True:
                self._exec("UPDATE frames SET settled = 0 WHERE region = ? AND key = ? AND settled = 1"
                           " AND (SELECT gen FROM versions WHERE version = frames.consensus) > ?", [region, key, gen])
                self._frames.pop((region, key), None)  # (not cached: nothing waits to be written)
            elif frame is not None and frame.settled and (self._gen(frame.consensus) or 0) > gen:
                self.set_frame(region, key, Frame(frame.head, frame.consensus, frame.round, False))
            self._gens[version] = gen
            return True

    def merge_of(self, parents: tuple[bytes, ...]) -> bytes | None:
        row = self._one("SELECT version FROM versions WHERE merge_of = ?", [b"".join(sorted(parents))])
        return None if row is None else row[0]

    _META_COLS = "version, parent, merge_of, author, gen, hlc, coherent, state"

    @staticmethod
    def _version_meta(row: tuple) -> VersionMeta:
        version, parent, merge_of, author, gen, hlc, coherent, state = row
        return VersionMeta(version, _parents(parent, merge_of), author, gen, hlc, bool(coherent), state)

    def version_meta(self, version: bytes) -> VersionMeta | None:
        row = self._one(f"SELECT {self._META_COLS} FROM versions WHERE version = ?", [version])
        return None if row is None else self._version_meta(row)

    def frame_meta(self, region: str, key: str, min_gen: int = 0) -> dict[bytes, VersionMeta]:
        """The versions of a frame from generation `min_gen` on."""
        rows = self._exec(f"SELECT {self._META_COLS} FROM versions WHERE region = ? AND key = ? AND gen >= ?",
                          [region, key, min_gen])
        return {row[0]: self._version_meta(row) for row in rows}

    def frame_meta_from(self, region: str, key: str, version: bytes) -> dict[bytes, VersionMeta]:
        """The versions of a frame from the generation of `version` (one of them) on; empty
        when `version` is not stored."""
        rows = self._exec(f"SELECT {self._META_COLS} FROM versions WHERE region = ? AND key = ?"
                          " AND gen >= (SELECT gen FROM versions WHERE version = ?)", [region, key, version])
        return {row[0]: self._version_meta(row) for row in rows}

    def set_states(self, states: dict[bytes, str]) -> None:
        """Write the states that changed (`states` holds only those)."""
        if states:
            with self._lock:
                self.db.conn.executemany("UPDATE versions SET state = ? WHERE version = ?",
                                         [(s, v) for v, s in states.items()])

    _VERSION_COLS = "region, key, version, parent, merge_of, value, author, hlc, state"

    def _frame_version(self, row: tuple) -> FrameVersion:
        region, key, version, parent, merge_of, value, author, hlc, state = row
        return FrameVersion(region, key, version.hex(), tuple(p.hex() for p in _parents(parent, merge_of)),
                            strict_loads(value), author, hlc, state)

    def version(self, version: bytes) -> FrameVersion | None:
        row = self._one(f"SELECT {self._VERSION_COLS} FROM versions WHERE version = ?", [version])
        return None if row is None else self._frame_version(row)

    def history(self, region: str, key: str) -> list[FrameVersion]:
        rows = self._exec(
            f"SELECT {self._VERSION_COLS} FROM versions WHERE region = ? AND key = ? ORDER BY gen, hlc, version",
            [region, key])
        return [self._frame_version(r) for r in rows]

    def consensus_versions(self) -> list[tuple]:
        """(region, key, version, parents, value, author, gen, hlc) of every frame's consensus."""
        rows = self._frames_query("SELECT v.region, v.key, v.version, v.parent, v.merge_of, v.value, v.author,"
                                  " v.gen, v.hlc FROM frames f JOIN versions v ON v.version = f.consensus"
                                  " ORDER BY v.region, v.key")
        return [(r, k, v, _parents(p, m), strict_loads(val), a, g, h) for r, k, v, p, m, val, a, g, h in rows]

    def rejection_reason(self, version: bytes) -> str | None:
        row = self._one("SELECT reason FROM versions WHERE version = ?", [version])
        return None if row is None else row[0]

    # -- frames ----------------------------------------------------------------------

    def frame(self, region: str, key: str) -> Frame:
        with self._lock:
            frame = self._frames.get((region, key), False) if self._tx else False
            if frame is False:
                row = self._one("SELECT head, consensus, round, settled FROM frames WHERE region = ? AND key = ?",
                                [region, key])
                frame = None if row is None else Frame(row[0], row[1], row[2] or 0, bool(row[3]))
                if self._tx:
                    self._frames[(region, key)] = frame
        return Frame(None, None, 0) if frame is None else frame

    def set_frame(self, region: str, key: str, frame: Frame) -> None:
        with self._lock:
            if self._tx:
                if self._frames.get((region, key)) == frame:
                    return
                self._pending_frames[(region, key)] = frame  # (written at COMMIT: _flush_frames)
            else:
                self._exec(_FRAME_UPSERT, [region, key, frame.head, frame.consensus, frame.round, int(frame.settled)])
            self._frames[(region, key)] = frame
            if len(self._to_compact) < COMPACT_QUEUE:
                self._to_compact[(region, key)] = None

    def regions(self) -> list[str]:
        return [r[0] for r in self._frames_query("SELECT DISTINCT region FROM frames ORDER BY region")]

    def keys(self, region: str) -> list[str]:
        return [r[0] for r in self._frames_query("SELECT key FROM frames WHERE region = ? ORDER BY key", [region])]

    def frame_heads(self) -> list[tuple[str, str, str | None, str | None]]:
        """(region, key, head hex, consensus hex) of every frame; None where it has none (a
        frame whose only versions are not eligible, such as those of non-members)."""
        rows = self._frames_query("SELECT region, key, head, consensus FROM frames ORDER BY region, key")
        return [(r, k, h.hex() if h else None, c.hex() if c else None) for r, k, h, c in rows]

    # -- diffs -----------------------------------------------------------------------

    def add_diff(self, msg_id: bytes, sender: str, seq: int, region: str, key: str, version: bytes,
                 parent: bytes | None, envelope: bytes, status: str) -> None:
        with self._lock:
            self._exec(
                "INSERT OR IGNORE INTO diffs (msg_id, sender, seq, region, key, version, parent, envelope, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [msg_id, sender, seq, region, key, version, parent, envelope, status])
            if status == "pending":
                self._idle.discard((region, key))

    def set_vote_envelopes(self, rows: list[tuple[bytes, str, str, str, int]]) -> None:
        """(envelope, region, key, voter, round) of votes stored before their envelopes were
        signed (in the same transaction)."""
        with self._lock:
            self.db.conn.executemany("UPDATE votes SET envelope = ? WHERE region = ? AND key = ? AND voter = ?"
                                     " AND round = ?", rows)

    def set_diff_status(self, msg_id: bytes, status: str) -> None:
        with self._lock:
            self._exec("UPDATE diffs SET status = ? WHERE msg_id = ?", [status, msg_id])
            if status == "pending":
                self._idle.clear()

    def waiting(self, region: str, key: str) -> bool:
        """Whether a frame may have diffs waiting for a parent, or voted merges not stored."""
        with self._lock:
            if self._tx and (region, key) in self._idle:
                return False
            found = self._one(
                "SELECT EXISTS (SELECT 1 FROM diffs WHERE status = 'pending' AND region = ? AND key = ?)"
                " OR EXISTS (SELECT 1 FROM votes WHERE region = ? AND key = ? AND merge_of IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM versions WHERE versions.version = votes.version))",
                [region, key, region, key])[0]
            if not found and self._tx:
                self._idle.add((region, key))
            return bool(found)

    def pending(self, region: str, key: str) -> list[tuple[bytes, bytes]]:
        """(msg_id, envelope) of the diffs of a frame still waiting for a parent."""
        return self._exec("SELECT msg_id, envelope FROM diffs WHERE status = 'pending'"
                               " AND region = ? AND key = ? ORDER BY seq", [region, key])

    def count_pending(self) -> int:
        """Diffs waiting for a parent."""
        return self._one("SELECT count(*) FROM diffs WHERE status = 'pending'", [])[0]

    # -- votes -----------------------------------------------------------------------

    def vote_at(self, region: str, key: str, voter: str, round_: int) -> tuple[bytes, bytes | None] | None:
        """(version, envelope) of a voter's vote in a round, if any (envelope None: stored
        when only a voter's latest kept its envelope)."""
        return self._one(f"SELECT version, {_VOTE_ENVELOPE} FROM votes WHERE region = ? AND key = ? AND voter = ?"
                         " AND round = ?",
                         [region, key, voter, round_])

    def add_vote(self, region: str, key: str, voter: str, round_: int, version: bytes, envelope: bytes,
                 merge_of: tuple[bytes, ...] | None = None) -> tuple[bytes, bytes | None] | None:
        """Store a vote with its signed envelope, or the message id of the diff that carries it
        (stored already, or in this transaction; anti-entropy sends the votes held of a frame,
        as fork choice reads them; Voting.compact_votes drops those no decision reads again).
        When the voter already has one in that round, store nothing and return (version,
        envelope) of the one held (envelope None: a vote stored when only a voter's latest
        kept its envelope)."""
        with self.transaction():
            if not self.db.conn.execute(
                    "INSERT OR IGNORE INTO votes (region, key, voter, round, version, merge_of, envelope)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", [region, key, voter, round_, version,
                                                      b"".join(sorted(merge_of)) if merge_of else None,
                                                      envelope]).rowcount:
                return self.vote_at(region, key, voter, round_)
            if merge_of:
                self._idle.discard((region, key))
            latest = self._latest_rounds(region, key)
            old = latest.get(voter)
            if old is not None and old[0] >= round_:  # a late one of an earlier round
                return None
            self._pending_latest[(region, key, voter)] = latest[voter] = (round_, version)  # (in a transaction)
            if region in self._voters:
                self._voters[region].add(voter)
            item, rounds = vote_item(voter, round_, version), round_
            if old is not None:  # the voter's previous latest vote leaves the sum
                item ^= vote_item(voter, old[0], old[1])
                rounds -= old[0]
            self._add_sum(region, key, item, 0, rounds)
            return None

    def _latest_rounds(self, region: str, key: str) -> dict[str, tuple[int, bytes]]:
        """voter -> (round, version) of its latest vote on a frame (kept in a transaction)."""
        if self._tx and (region, key) in self._latest:
            return self._latest[(region, key)]
        latest = {voter: (round_, version) for voter, round_, version in self._exec(
            "SELECT voter, round, version FROM latest WHERE region = ? AND key = ? ORDER BY voter", [region, key])}
        if self._tx:
            self._latest[(region, key)] = latest
        else:  # (a vote stored outside a transaction would leave the kept one behind)
            self._latest.pop((region, key), None)
        return latest

    def decided_frames(self, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` frames decided (set_frame) since they were last handed out here,
        oldest first (for compacting their votes)."""
        with self._lock:
            frames = list(islice(self._to_compact, limit))
            for frame in frames:
                del self._to_compact[frame]
        return frames

    def vote_rows(self, region: str, key: str) -> dict[str, list[tuple[int, bytes, int | None]]]:
        """voter -> (round, version, the version's generation or None when not held) of
        every vote it cast on this frame, in round order."""
        out: dict[str, list[tuple[int, bytes, int | None]]] = {}
        for voter, round_, version, gen in self._exec(
                "SELECT v.voter, v.round, v.version, x.gen FROM votes v LEFT JOIN versions x ON x.version = v.version"
                " WHERE v.region = ? AND v.key = ? ORDER BY v.voter, v.round", [region, key]):
            out.setdefault(voter, []).append((round_, version, gen))
        return out

    def drop_votes(self, region: str, key: str, votes: Iterable[tuple[str, int]]) -> int:
        """Delete votes on this frame by (voter, round); how many went."""
        with self.transaction():
            return self.db.conn.executemany("DELETE FROM votes WHERE region = ? AND key = ? AND voter = ? AND round = ?",
                                            [(region, key, voter, r) for voter, r in votes]).rowcount

    def voted_merges(self, region: str, key: str) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """(version, parents) of voted merges of a frame that this store does not hold."""
        rows = self._exec(
            "SELECT DISTINCT version, merge_of FROM votes WHERE region = ? AND key = ? AND merge_of IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM versions WHERE versions.version = votes.version)", [region, key])
        return [(v, split_hashes(m)) for v, m in rows]

    def latest_votes(self, region: str, key: str) -> dict[str, bytes]:
        """voter -> the version of its highest-round vote on this frame."""
        with self._lock:
            return {voter: version for voter, (_, version) in self._latest_rounds(region, key).items()}

    def latest_round(self, region: str, key: str, voter: str) -> int:
        """The round of a voter's highest-round vote on this frame (0: none)."""
        with self._lock:
            latest = self._latest_rounds(region, key).get(voter)
            return latest[0] if latest else 0

    def read_sums(self, root: str, take: Callable[[Iterable[tuple[int, int, int, int]]], T]) -> tuple[int, T]:
        """`take` applied to (position, frame hash, authored versions, sum of latest rounds)
        of every frame in the region tree `root`, in position order, streamed (a store may
        hold 100k frames); with the generation of `sums` they reflect."""
        with self._lock:
            self._flush_sums()
            return self.sums_gen, take(self.db.conn.execute(
                "SELECT pos, hash, versions, rounds FROM sums WHERE region = ? OR substr(region, 1, ?) = ?"
                " ORDER BY pos", [root, len(root) + 1, root + "/"]))

    def frame_at(self, root: str, pos: int) -> tuple[str, str] | None:
        """(region, key) of the frame at a digest position in the region tree `root`."""
        with self._lock:
            self._flush_sums()
            row = self._one("SELECT region, key FROM sums WHERE pos = ? AND (region = ? OR substr(region, 1, ?) = ?)",
                            [pos, root, len(root) + 1, root + "/"])
        return None if row is None else (row[0], row[1])

    def frame_items(self, region: str, key: str, since: int = 0
                    ) -> tuple[list[tuple[bytes, bytes | None]], list[tuple[str, int, bytes]]]:
        """What anti-entropy sends of a frame: (version, diff envelope or None) of its
        authored versions in generation order (from generation `since` on), and (voter,
        round, vote envelope) of the votes held with their envelopes, each voter's in round
        order (its latest last: what the frame's sum covers)."""
        with self._lock:
            versions = self._exec(
                "SELECT v.version, (SELECT envelope FROM diffs d WHERE d.version = v.version AND d.status = 'applied'"
                " LIMIT 1) FROM versions v WHERE v.region = ? AND v.key = ? AND v.author != '' AND v.gen >= ?"
                " ORDER BY v.gen", [region, key, since])
            return versions, self.frame_votes(region, key)

    def frame_votes(self, region: str, key: str, voter: str | None = None) -> list[tuple[str, int, bytes]]:
        """(voter, round, vote envelope) of the votes held of a frame with their envelopes
        (of one voter, if given), each voter's in round order."""
        return self._exec(f"SELECT voter, round, {_VOTE_ENVELOPE} FROM votes WHERE region = ? AND key = ?"
                          " AND envelope IS NOT NULL AND (? IS NULL OR voter = ?) ORDER BY voter, round",
                          [region, key, voter, voter])

    def frame_versions(self, region: str, key: str, newest: int | None = None) -> list[tuple[bytes, int]]:
        """(version, generation) of a frame's authored versions, in generation order; with
        `newest`, only the newest that many (and those of the oldest one's generation)."""
        with self._lock:
            since = 0
            if newest is not None:
                row = self._one("SELECT gen FROM versions WHERE region = ? AND key = ? AND author != ''"
                                " ORDER BY gen DESC LIMIT 1 OFFSET ?", [region, key, newest - 1])
                since = 0 if row is None else row[0]
            return [tuple(r) for r in self._exec("SELECT version, gen FROM versions WHERE region = ? AND key = ?"
                                                 " AND author != '' AND gen >= ? ORDER BY gen", [region, key, since])]

    def version_summary(self, region: str, key: str) -> tuple[int, int]:
        """(count, XOR of the item hashes) of a frame's authored versions, from its sum (which
        also holds its voters' latest votes), without reading its history."""
        with self._lock:
            if self._tx:
                self._flush_latest()
                self._flush_sums()
            row = self._one("SELECT hash, versions FROM sums WHERE region = ? AND key = ?", [region, key])
            latest = self._exec("SELECT voter, round, version FROM latest WHERE region = ? AND key = ?", [region, key])
        if row is None:
            return 0, 0
        return row[1], reduce(xor, (vote_item(*vote) for vote in latest), row[0])

    def vote_rounds(self, region: str, key: str) -> dict[str, int]:
        """voter -> the latest round of its votes on a frame held with their envelopes (the
        votes frame_items lists)."""
        return dict(self._exec("SELECT voter, MAX(round) FROM votes WHERE region = ? AND key = ?"
                               " AND envelope IS NOT NULL GROUP BY voter", [region, key]))

    def votes_in_order(self, region: str, key: str) -> dict[str, list[bytes]]:
        """voter -> the versions it voted for on this frame, in round order."""
        return {voter: [version for _, version, _ in rows] for voter, rows in self.vote_rows(region, key).items()}

    def voted_frames(self, voter: str) -> list[tuple[str, str]]:
        return [tuple(r) for r in self._exec("SELECT DISTINCT region, key FROM votes WHERE voter = ?", [voter])]

    def flag(self, node_id: str, reason: str, evidence_a: bytes, evidence_b: bytes) -> None:
        with self._lock:
            self._exec("INSERT OR IGNORE INTO flagged (node_id, reason, evidence_a, evidence_b) VALUES (?, ?, ?, ?)",
                       [node_id, reason, evidence_a, evidence_b])
            if self._flagged is not None:
                self._flagged |= {node_id}

    def flag_reason(self, node_id: str) -> str | None:
        row = self._one("SELECT reason FROM flagged WHERE node_id = ?", [node_id])
        return None if row is None else row[0]

    def certificates(self) -> dict[str, bytes]:
        """The admission certificates peers presented (see node/admission.py)."""
        return dict(self._exec("SELECT node_id, certificate FROM certificates"))

    def set_certificate(self, node_id: str, certificate: bytes) -> None:
        with self.transaction():
            self._exec("INSERT INTO certificates (node_id, certificate) VALUES (?, ?)"
                       " ON CONFLICT (node_id) DO UPDATE SET certificate = excluded.certificate", [node_id, certificate])

    def flagged(self) -> frozenset[str]:
        with self._lock:
            flagged = self._flagged if self._tx else None
            if flagged is None:
                flagged = frozenset(r[0] for r in self._exec("SELECT node_id FROM flagged"))
                if self._tx:
                    self._flagged = flagged
            return flagged

    # -- peers and health ------------------------------------------------------------

    _PEER_COLS = ("session", "birth_hlc", "death_hlc", "alive", "regions", "software", "fingerprint",
                  "fingerprint_hlc")

    def peer(self, node_id: str) -> dict | None:
        row = self._one(f"SELECT {', '.join(self._PEER_COLS)} FROM peers WHERE node_id = ?", [node_id])
        if row is None:
            return None
        peer = dict(zip(self._PEER_COLS, row))
        for name in ("regions", "fingerprint"):
            peer[name] = strict_loads(peer[name]) if peer[name] is not None else None
        return peer

    def peers(self) -> dict[str, dict]:
        return {node_id: self.peer(node_id) for (node_id,) in self._exec("SELECT node_id FROM peers ORDER BY node_id")}

    def set_peer(self, node_id: str, **fields) -> None:
        unknown = set(fields) - set(self._PEER_COLS)
        if unknown:
            raise ValueError(f"unknown peer fields {unknown}")
        values = {k: canonical(v) if k in ("regions", "fingerprint") else v for k, v in fields.items()}
        with self.transaction():
            self._exec("INSERT OR IGNORE INTO peers (node_id, session, alive) VALUES (?, 0, 0)", [node_id])
            self._exec(f"UPDATE peers SET {', '.join(f'{k} = ?' for k in values)} WHERE node_id = ?",
                       [*values.values(), node_id])

    def frame_counts(self) -> dict[str, int]:
        (frames, shadows), = self._frames_query(
            "SELECT count(*), coalesce(sum(consensus IS NULL OR head != consensus), 0) FROM frames")
        return {"frames": frames, "shadows": shadows}

    def frames_with_forks(self) -> int:
        return self._one("SELECT count(DISTINCT region || char(0) || key) FROM versions WHERE state = 'fork'", [])[0]

    def fork_count(self) -> int:
        return self._one("SELECT count(*) FROM versions WHERE state = 'fork'", [])[0]

    # -- trace -----------------------------------------------------------------------

    def add_trace(self, node_id: str, seq: int, hash_: bytes, prev: bytes | None, entry: bytes, sig: bytes) -> None:
        self.add_traces(node_id, [(seq, hash_, prev, entry, sig)])

    def add_traces(self, node_id: str, rows: list[tuple[int, bytes, bytes | None, bytes, bytes]]) -> None:
        """Entries of one node's trace, (seq, hash, prev, entry, signature) in seq order."""
        with self._lock:
            self.db.conn.executemany("INSERT INTO trace (node_id, seq, hash, prev, entry, sig) VALUES (?, ?, ?, ?, ?, ?)",
                                     [(node_id, *row) for row in rows])
            if rows and node_id in self._trace_heads:
                head, (seq, hash_) = self._trace_heads[node_id], rows[-1][:2]
                if head is None or seq > head[0]:
                    self._trace_heads[node_id] = (seq, hash_)

    def trace_head(self, node_id: str) -> tuple[int, bytes] | None:
        with self._lock:
            if self._tx and node_id in self._trace_heads:
                return self._trace_heads[node_id]
            head = self._one("SELECT seq, hash FROM trace WHERE node_id = ? ORDER BY seq DESC LIMIT 1", [node_id])
            if self._tx:
                self._trace_heads[node_id] = head
            return head

    def trace_entry(self, node_id: str, seq: int) -> tuple[bytes, bytes] | None:
        """(hash, entry) of one trace entry."""
        return self._one("SELECT hash, entry FROM trace WHERE node_id = ? AND seq = ?", [node_id, seq])

    def trace_range(self, node_id: str, start: int, end: int | None) -> list[tuple[bytes, bytes]]:
        """(entry, signature) of a node's trace from seq `start` to `end` (inclusive; None: all)."""
        return self._exec("SELECT entry, sig FROM trace WHERE node_id = ? AND seq >= ? AND seq <= ? ORDER BY seq",
                          [node_id, start, end if end is not None else 2**62])

    def trace_base(self, node_id: str) -> int | None:
        """The lowest seq held of a node's trace (entries below it were pruned, or never fetched)."""
        row = self._one("SELECT MIN(seq) FROM trace WHERE node_id = ?", [node_id])
        return row[0] if row else None

    def trace_top(self, node_id: str, upto: int) -> int | None:
        """The highest seq held of a node's trace up to `upto`."""
        return self._one("SELECT MAX(seq) FROM trace WHERE node_id = ? AND seq <= ?", [node_id, upto])[0]

    def prune_trace(self, node_id: str, kept: int) -> int:
        """Drop all but the last `kept` entries held of a node's trace (counted, not by seq: a
        trace started anew has a gap); how many went."""
        with self.transaction():
            return self.db.conn.execute(
                "DELETE FROM trace WHERE node_id = ? AND seq < (SELECT seq FROM trace WHERE node_id = ?"
                " ORDER BY seq DESC LIMIT 1 OFFSET ?)", [node_id, node_id, kept - 1]).rowcount

    def traced_nodes(self) -> list[str]:
        return [r[0] for r in self._exec("SELECT DISTINCT node_id FROM trace ORDER BY node_id")]

    # -- outbox ----------------------------------------------------------------------

    def queue(self, items: list[Queued]) -> None:
        """Own envelopes to publish (in the caller's transaction)."""
        with self._lock:
            self.db.conn.executemany("INSERT OR IGNORE INTO outbox (msg_id, topic, envelope, seq) VALUES (?, ?, ?, ?)",
                                     [(q.msg_id, q.topic, q.envelope, q.seq) for q in items])

    def unpublished(self, limit: int = -1, after_seq: int = 0, until_seq: int | None = None) -> list[Queued]:
        """Own envelopes the broker has not acknowledged, oldest first."""
        rows = self._exec("SELECT msg_id, topic, envelope, seq FROM outbox WHERE seq > ? AND seq <= ?"
                          " ORDER BY seq LIMIT ?", [after_seq, 2**62 if until_seq is None else until_seq, limit])
        return [Queued(*r) for r in rows]

    def mark_published(self, seqs: list[int]) -> None:
        """The broker has them (by sequence number): the outbox lets them go (the diffs and
        votes tables keep them)."""
        with self.transaction():
            self.db.conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
