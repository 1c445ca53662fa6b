"""The run store: one SQLite file per results folder (``runs.sqlite``).

Every run is one row keyed by its deterministic run key, written in a single
transaction together with its validator scores, so a sweep killed at any
moment (even ``kill -9``) leaves either the whole run or nothing: a rerun
skips the keys already present and adds the rest, with no lost and no
duplicated rows.  WAL journalling keeps readers (the leaderboard) from
blocking the writer.

Rows are scalar (no blobs); hyperparameters, protocol and budget are stored
as canonical JSON text.

Tables: ``runs`` (one row per run), ``scores`` (one row per run and
validator), ``source_models`` (one row per shared source model a sweep
trained: pair, seed, backbone, recipe, source validation accuracy; see
:mod:`dabench.source_model`) and ``extras`` (per-run statistics, one small
row per run and name: a number in ``value`` or a short text in ``text``):
label-free ones for the negative-transfer warning (e.g. the predicted target
class prior, or the predicted classes of the first target points), the
methods' health signals (``diag_<name>``), and the host's labelled ones for
the verdicts (``target_correct``: which target test points the run got right,
packed bits as text; ``source_chance`` / ``target_chance`` and the split
sizes, against which a failed training is recognised).  ``extras``
was added after schema 1 shipped; it is created on open, so older stores
keep working (their runs simply have no extras).  Likewise the columns
``rss_peak_mb`` and ``gpu_peak_mb`` (which replaced ``peak_mem_mb``: that
one mixed the CPU process high-water mark, baseline included, with the CUDA
allocator's peak), ``threads`` and ``torch_version`` (what else determines a
result) and ``track`` (the method's track, :data:`dabench.contract.TRACKS`)
are added to older stores when they are opened for writing; their old rows
keep ``peak_mem_mb`` and read None in the new columns (``track``: ``uda``).

Concurrent invocations on one results folder share the work through
``leases``: a driver *claims* a run (in a transaction) right before it
computes it, recording its owner (a token per invocation, the pid and the
host); another invocation skips a run whose lease is held by an owner that
is alive and waits for it to be stored.  A lease expires when its owner is
gone: on the same host when the pid is dead (or is another process now),
on another host when its heartbeat is older than :data:`LEASE_TTL_S`.  A
stored ``ok`` row is never overwritten by a ``failed`` or ``skipped`` one,
nor a ``skipped`` row by a ``failed`` one; a ``failed`` row may be replaced
(``--retry-failed``).

Reading never writes: :meth:`RunStore.open_readonly` (the leaderboard, the
reports, ``dabench leaderboard``) opens the file read-only, so a store on a
read-only mount can be reported on.  A file that is not a readable SQLite
database (truncated, overwritten) gives one :class:`StoreError` naming the
file and how to recover; a full disk says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
STORE_NAME = "runs.sqlite"

RUN_COLUMNS: dict[str, str] = {
    "key": "TEXT PRIMARY KEY",
    "suite": "TEXT NOT NULL",
    "pair": "TEXT NOT NULL",
    "method": "TEXT NOT NULL",
    "method_version": "TEXT NOT NULL",
    "family": "TEXT NOT NULL",
    "reference": "INTEGER NOT NULL",
    "params": "TEXT NOT NULL",
    "point": "INTEGER NOT NULL",
    "seed": "INTEGER NOT NULL",
    "protocol": "TEXT NOT NULL",
    "budget": "TEXT NOT NULL",
    "backbone": "TEXT NOT NULL",
    # the method's track (added after schema 1 shipped: older stores get the column on open)
    "track": "TEXT",
    "status": "TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'skipped'))",
    "reason": "TEXT",
    "target_acc": "REAL",
    "target_f1": "REAL",
    "source_acc": "REAL",
    "wall_time_s": "REAL",
    #: the run's peak resident memory above the worker's RSS when the run
    #: started (CPU memory the run itself added), in MiB
    "rss_peak_mb": "REAL",
    #: the peak of torch's CUDA allocator during the run, in MiB (None on CPU)
    "gpu_peak_mb": "REAL",
    "device": "TEXT",
    # what else determines a result: torch threads per run, torch version
    # (added after schema 1 shipped: older stores get the columns on open)
    "threads": "INTEGER",
    "torch_version": "TEXT",
    "started_at": "TEXT",
    "finished_at": "TEXT",
    "dabench_version": "TEXT",
}


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value, the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of everything that changes a run's result."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


class StoreError(RuntimeError):
    """The store cannot be opened, read or written; the message names the
    file and what to do."""


#: A stored run is never replaced by a lower-ranked one (an ok result by a failure).
_RANK = {"failed": 0, "skipped": 1, "ok": 2}

#: Seconds after which a lease of an owner on another host, whose heartbeat
#: stopped, is considered abandoned (owners renew it every minute or so).
LEASE_TTL_S = 600.0

def _corrupt(path: Path, exc: BaseException) -> StoreError:
    return StoreError(
        f"{path} is not a readable dabench run store ({exc}): the file is damaged (truncated, overwritten or "
        f"not a SQLite database). Keep a copy of it, then restore a backup copy, or recover what SQLite can "
        f"read with `sqlite3 {path} .recover | sqlite3 recovered.sqlite` and use the recovered file as "
        f"{STORE_NAME} of a new results folder; or move the file away and rerun the suite into a new --results folder")


def _is_full(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()) or \
        (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)


def _full(path: Path) -> StoreError:
    return StoreError(f"the disk holding {path} is full (SQLite: database or disk is full): free some space "
                      f"and rerun the same command; every run stored before is intact")


def _translate(path: Path, exc: BaseException) -> BaseException:
    """A StoreError for damaged files and full disks; other errors unchanged."""
    if _is_full(exc):
        return _full(path)
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return _corrupt(path, exc)
    if isinstance(exc, sqlite3.OperationalError) and "malformed" in str(exc):
        return _corrupt(path, exc)
    return exc


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), to tell a live
    owner from a later process that reuses its pid; None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Lease:
    """Who holds a run: an invocation's token, pid and host."""

    key: str
    owner: str
    pid: int
    host: str
    pid_start: str | None
    heartbeat: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def alive(self, now: float | None = None) -> bool:
        """Whether the owner may still be computing the run."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid):
                return False
            start = _process_start(self.pid)
            if start is not None and self.pid_start is not None and start != self.pid_start:
                return False  # the pid now belongs to another process
            if start is not None and self.pid_start is not None:
                return True
        return now - self.heartbeat < LEASE_TTL_S


@dataclass(frozen=True)
class Claim:
    """The answer to :meth:`RunStore.claim`: ``"claimed"`` (compute it),
    ``"done"`` (stored meanwhile, by this or another invocation) or
    ``"held"`` (another live invocation computes it: ``lease`` says who)."""

    state: str
    lease: Lease | None = None


class RunScores(dict):
    """Validator scores ``{name: float | None}`` of one run, carrying the
    run's label-free statistics in ``extras`` (``{name: float | str}``).

    A plain dict is accepted wherever this is; the extras ride along with
    the scores so the run loop needs no change to store them.
    """

    def __init__(self, *args: Any, extras: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extras: dict[str, Any] = dict(extras or {})


class RunStore:
    """A results folder's SQLite store.

    ``RunStore(folder)`` opens it for writing (creating it unless
    ``create=False``); :meth:`open_readonly` opens it for reading only."""

    def __init__(self, folder: str | Path, create: bool = True, *, readonly: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STORE_NAME
        self.readonly = readonly
        #: this invocation's lease owner token (see :meth:`claim`)
        self.owner = uuid.uuid4().hex
        self._pid_start = _process_start(os.getpid())
        if not self.path.exists():
            if not create or readonly:
                raise StoreError(f"no run store at {self.path}: run `dabench run SUITE --results {self.folder}` first")
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the results folder {self.folder}: {exc}") from None
        elif not self.path.is_file():
            raise StoreError(f"{self.path} is not a file; move it away or choose another --results folder")
        try:
            if readonly:
                self._con = self._connect_readonly()
            else:
                self._con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute("PRAGMA synchronous=NORMAL")
                self._con.execute("PRAGMA busy_timeout=60000")
            self._init()
        except sqlite3.Error as exc:
            err = _translate(self.path, exc)
            if err is exc:
                if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc).lower():
                    err = StoreError(f"{self.path} cannot be written ({exc}): `dabench run` needs a writable "
                                     f"results folder; reports can be read from it (`dabench leaderboard {self.folder}`)")
                else:
                    err = StoreError(f"{self.path}: {exc}")
            raise err from None

    @classmethod
    def open_readonly(cls, folder: str | Path) -> "RunStore":
        """Open an existing store for reading only: nothing is created or
        written (not even the WAL files when the folder is read-only)."""
        return cls(folder, create=False, readonly=True)

    def _connect_readonly(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError as exc:
            con.close()
            if "unable to open" not in str(exc) and "readonly" not in str(exc).lower():
                raise
        # a WAL store in a read-only folder: SQLite cannot create the shared
        # memory file; nobody can write there either, so read it as immutable
        con = sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=60, isolation_level=None)
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return con

    def _init(self) -> None:
        if self.readonly:
            names = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "runs"} <= names:
                raise StoreError(f"{self.path} is a SQLite file but not a dabench run store (no runs table); "
                                 f"point --results at the folder `dabench run` wrote")
            self._check_schema(self._con)
            self._tables = names
            self._columns = [r[1] for r in self._con.execute("PRAGMA table_info(runs)")]
            return
        cols = ", ".join(f"{k} {v}" for k, v in RUN_COLUMNS.items())
        with self.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            con.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE, "
                "validator TEXT NOT NULL, value REAL, PRIMARY KEY (key, validator))"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS extras (key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE, "
                "name TEXT NOT NULL, value REAL, text TEXT, PRIMARY KEY (key, name))"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER NOT NULL, "
                "host TEXT NOT NULL, pid_start TEXT, heartbeat REAL NOT NULL)"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS source_models (key TEXT PRIMARY KEY, pair TEXT NOT NULL, "
                "seed INTEGER NOT NULL, backbone TEXT NOT NULL, recipe TEXT NOT NULL, identity TEXT NOT NULL, "
                "source_val_acc REAL, wall_time_s REAL, trained_by TEXT, trained_at TEXT)"
            )
            # columns added after schema 1 shipped (older stores get them on open)
            have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            for k, v in RUN_COLUMNS.items():
                if k not in have:
                    con.execute(f"ALTER TABLE runs ADD COLUMN {k} {v}")
            row = con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._check_schema(con)
        self._tables = {"meta", "runs", "scores", "extras", "leases", "source_models"}
        self._columns = [r[1] for r in self._con.execute("PRAGMA table_info(runs)")]

    def _check_schema(self, con: sqlite3.Connection) -> None:
        row = con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is not None and str(row[0]) != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has store schema {row[0]}, this dabench writes schema {SCHEMA_VERSION}: "
                f"use a new --results folder"
            )

    class _Tx:
        def __init__(self, store: "RunStore") -> None:
            self.store = store
            self.con = store._con

        def __enter__(self) -> sqlite3.Connection:
            if self.store.readonly:
                raise StoreError(f"{self.store.path} was opened read-only; this is a bug in the caller")
            try:
                self.con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _translate(self.store.path, exc) from None
            return self.con

        def __exit__(self, exc_type, exc, tb) -> bool:
            path = self.store.path
            if exc_type is None:
                try:
                    self.con.execute("COMMIT")
                    return False
                except sqlite3.Error as commit_exc:
                    exc = commit_exc
            # SQLite rolls a transaction back by itself on some errors (a full
            # disk): roll back only what is still open, and report the cause
            if self.con.in_transaction:
                try:
                    self.con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, (sqlite3.Error, OSError)):
                err = _translate(path, exc)
                if err is not exc:
                    raise err from None
            if exc_type is None:  # the COMMIT failed
                raise StoreError(f"{path}: {exc}") from None
            return False

    def transaction(self) -> "RunStore._Tx":
        return RunStore._Tx(self)

    def close(self) -> None:
        if not self.readonly:
            try:
                self.release_all()
            except (StoreError, sqlite3.Error):
                pass
        self._con.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._con.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            err = _translate(self.path, exc)
            if err is exc:
                raise StoreError(f"{self.path}: {exc}") from None
            raise err from None

    # ------------------------------------------------------------------ reads

    def statuses(self) -> dict[str, str]:
        """``{key: status}`` of every stored run."""
        return dict(self._read("SELECT key, status FROM runs"))

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM runs")[0][0])

    def rows(self) -> list[dict[str, Any]]:
        """Every run as a flat dict, with ``val_<validator>`` entries for scores
        and ``x_<name>`` entries for extras.  Columns an older store lacks are None."""
        cols = [c for c in RUN_COLUMNS if c in self._columns]
        out = {}
        for r in self._read(f"SELECT {', '.join(cols)} FROM runs ORDER BY suite, pair, method, point, seed"):
            row = dict.fromkeys(RUN_COLUMNS)
            row.update(zip(cols, r))
            out[row["key"]] = row
        if "scores" in self._tables:
            for key, validator, value in self._read("SELECT key, validator, value FROM scores"):
                if key in out:
                    out[key][f"val_{validator}"] = value
        if "extras" in self._tables:
            for key, name, value, text in self._read("SELECT key, name, value, text FROM extras ORDER BY key, name"):
                if key in out:
                    out[key][f"x_{name}"] = text if text is not None else value
        return list(out.values())

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows())

    def get_meta(self, name: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    # ----------------------------------------------------------------- leases

    def _lease(self, row: tuple | None) -> Lease | None:
        return None if row is None else Lease(*row)

    def claim(self, key: str, retry_failed_before: str | None = None) -> Claim:
        """Claim run ``key`` for this invocation, in one transaction.

        ``"done"`` when a row is stored (a ``failed`` one counts as done
        unless ``retry_failed_before`` is given and the row finished before
        it: then it is claimed again); ``"held"`` when another owner's lease
        is alive; else the lease is (re)taken and ``"claimed"``."""
        now = time.time()
        with self.transaction() as con:
            row = con.execute("SELECT status, finished_at FROM runs WHERE key = ?", (key,)).fetchone()
            if row is not None:
                retry = (row[0] == "failed" and retry_failed_before is not None
                         and (row[1] is None or str(row[1]) < retry_failed_before))
                if not retry:
                    return Claim("done")
            lease = self._lease(con.execute(
                "SELECT key, owner, pid, host, pid_start, heartbeat FROM leases WHERE key = ?", (key,)).fetchone())
            if lease is not None and lease.owner != self.owner and lease.alive(now):
                return Claim("held", lease)
            con.execute("INSERT OR REPLACE INTO leases (key, owner, pid, host, pid_start, heartbeat) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (key, self.owner, os.getpid(), socket.gethostname(), self._pid_start, now))
        return Claim("claimed")

    def lease_of(self, key: str) -> Lease | None:
        """The lease on ``key`` (None when nobody holds it)."""
        rows = self._read("SELECT key, owner, pid, host, pid_start, heartbeat FROM leases WHERE key = ?", (key,)) \
            if "leases" in self._tables else []
        return self._lease(rows[0]) if rows else None

    def renew(self) -> None:
        """Refresh the heartbeat of this invocation's leases."""
        with self.transaction() as con:
            con.execute("UPDATE leases SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner))

    def release(self, key: str) -> None:
        """Give up this invocation's lease on ``key`` (the run was not stored)."""
        with self.transaction() as con:
            con.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (key, self.owner))

    def release_all(self) -> None:
        """Give up every lease of this invocation."""
        if "leases" not in self._tables:
            return
        with self.transaction() as con:
            con.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))

    # ----------------------------------------------------------------- writes

    def set_meta(self, name: str, value: str) -> None:
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def write(self, record: dict[str, Any], scores: dict[str, float] | None = None) -> bool:
        """Store a run and its scores in one transaction and release its lease;
        ``scores.extras`` (a :class:`RunScores`) go to the ``extras`` table.

        A stored row is never replaced by a worse one: an ``ok`` row only by
        an ``ok`` one, a ``skipped`` row not by a ``failed`` one (e.g. a late
        failure of an invocation whose lease had expired); then nothing is
        written and False is returned.  A ``failed`` row is replaced."""
        missing = [k for k, v in RUN_COLUMNS.items() if "NOT NULL" in v and record.get(k) is None]
        if missing:
            raise StoreError(f"run record lacks {missing}")
        values = [record.get(k) for k in RUN_COLUMNS]
        values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
        with self.transaction() as con:
            con.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (record["key"], self.owner))
            row = con.execute("SELECT status FROM runs WHERE key = ?", (record["key"],)).fetchone()
            if row is not None and _RANK.get(record["status"], 0) < _RANK.get(row[0], 0):
                return False
            con.execute("DELETE FROM scores WHERE key = ?", (record["key"],))
            con.execute("DELETE FROM extras WHERE key = ?", (record["key"],))
            con.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                values,
            )
            for name, value in (scores or {}).items():
                v = float(value) if value is not None and math.isfinite(float(value)) else None
                con.execute("INSERT INTO scores (key, validator, value) VALUES (?, ?, ?)", (record["key"], name, v))
            for name, value in (getattr(scores, "extras", None) or {}).items():
                if isinstance(value, str):
                    row = (record["key"], str(name), None, value)
                else:
                    v = float(value) if value is not None and math.isfinite(float(value)) else None
                    row = (record["key"], str(name), v, None)
                con.execute("INSERT INTO extras (key, name, value, text) VALUES (?, ?, ?, ?)", row)
        return True

    def add_source_model(self, info: Any, trained_by: str | None = None) -> None:
        """Record that a shared source model (a
        :class:`dabench.source_model.SourceModelInfo`) was trained; one row per
        cache key (a model retrained after its cache entry was lost updates it)."""
        from datetime import datetime, timezone

        ident = info.identity
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO source_models (key, pair, seed, backbone, recipe, identity, source_val_acc, "
                "wall_time_s, trained_by, trained_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.key, ident["pair"], int(ident["seed"]), ident["backbone"], canonical_json(ident["recipe"]),
                 canonical_json(ident), info.source_val_acc, info.wall_time_s, trained_by,
                 datetime.now(timezone.utc).isoformat(timespec="seconds")))

    def source_models(self) -> list[dict[str, Any]]:
        """Every shared source model this store's sweeps trained."""
        if "source_models" not in self._tables:  # an older store, opened read-only
            return []
        cols = ["key", "pair", "seed", "backbone", "recipe", "source_val_acc", "wall_time_s", "trained_by", "trained_at"]
        rows = self._read(f"SELECT {', '.join(cols)} FROM source_models ORDER BY pair, seed, backbone")
        return [dict(zip(cols, r)) for r in rows]

    def delete(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        with self.transaction() as con:
            for k in keys:
                con.execute("DELETE FROM scores WHERE key = ?", (k,))
                con.execute("DELETE FROM extras WHERE key = ?", (k,))
                con.execute("DELETE FROM runs WHERE key = ?", (k,))
        return len(keys)


def open_store(folder: str | Path, create: bool = False) -> RunStore:
    return RunStore(folder, create=create)


def export_csv(folder: str | Path, out: str | Path) -> Path:
    with closing(RunStore.open_readonly(folder)) as st:
        st.dataframe().to_csv(out, index=False)
    return Path(out)
