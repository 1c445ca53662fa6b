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
:mod:`dabench.source_model`) and ``extras`` (label-free per-run statistics the leaderboard's
negative-transfer warning uses, one small row per run and name: a number in
``value`` or a short text in ``text``, e.g. the predicted target class
prior, or the predicted classes of the first target points).  ``extras``
was added after schema 1 shipped; it is created on open, so older stores
keep working (their runs simply have no extras).  Likewise the ``runs``
columns ``threads`` and ``torch_version`` (what else determines a result)
are added to an older store on open; its runs read None there.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from contextlib import closing
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
    "status": "TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'skipped'))",
    "reason": "TEXT",
    "target_acc": "REAL",
    "target_f1": "REAL",
    "source_acc": "REAL",
    "wall_time_s": "REAL",
    "peak_mem_mb": "REAL",
    "device": "TEXT",
    # what else determines a result: torch threads per run, torch version
    # (added after schema 1 shipped: older stores get the columns on open)
    "threads": "INTEGER",
    "torch_version": "TEXT",
    "started_at": "TEXT",
    "finished_at": "TEXT",
    "dabench_version": "TEXT",
}


#: Columns added to ``runs`` after schema 1 shipped (nullable; added on open).
ADDED_COLUMNS = ("threads", "torch_version")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value, the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of everything that changes a run's result."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


class StoreError(RuntimeError):
    pass


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
    """A results folder's SQLite store."""

    def __init__(self, folder: str | Path, create: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STORE_NAME
        if not self.path.exists():
            if not create:
                raise StoreError(f"no run store at {self.path}: run `dabench run SUITE --results {self.folder}` first")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("PRAGMA busy_timeout=60000")
        self._init()

    def _init(self) -> None:
        cols = ", ".join(f"{k} {v}" for k, v in RUN_COLUMNS.items())
        with self.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            for name in ADDED_COLUMNS:
                if name not in have:  # a store written before the column existed: its runs read NULL
                    con.execute(f"ALTER TABLE runs ADD COLUMN {name} {RUN_COLUMNS[name]}")
            con.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE, "
                "validator TEXT NOT NULL, value REAL, PRIMARY KEY (key, validator))"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS extras (key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE, "
                "name TEXT NOT NULL, value REAL, text TEXT, PRIMARY KEY (key, name))"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS source_models (key TEXT PRIMARY KEY, pair TEXT NOT NULL, "
                "seed INTEGER NOT NULL, backbone TEXT NOT NULL, recipe TEXT NOT NULL, identity TEXT NOT NULL, "
                "source_val_acc REAL, wall_time_s REAL, trained_by TEXT, trained_at TEXT)"
            )
            row = con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has store schema {row[0]}, this dabench writes schema {SCHEMA_VERSION}: "
                    f"use a new --results folder"
                )

    class _Tx:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def __enter__(self) -> sqlite3.Connection:
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, exc_type, exc, tb) -> None:
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> "RunStore._Tx":
        return RunStore._Tx(self._con)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reads

    def statuses(self) -> dict[str, str]:
        """``{key: status}`` of every stored run."""
        return dict(self._con.execute("SELECT key, status FROM runs").fetchall())

    def count(self) -> int:
        return int(self._con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def rows(self) -> list[dict[str, Any]]:
        """Every run as a flat dict, with ``val_<validator>`` entries for scores
        and ``x_<name>`` entries for extras."""
        have = {r[1] for r in self._con.execute("PRAGMA table_info(runs)")}
        cols = [c for c in RUN_COLUMNS if c in have]  # an older store may lack the added columns
        cur = self._con.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY suite, pair, method, point, seed")
        out = {r[0]: dict(dict.fromkeys(RUN_COLUMNS), **dict(zip(cols, r))) for r in cur.fetchall()}
        for key, validator, value in self._con.execute("SELECT key, validator, value FROM scores"):
            if key in out:
                out[key][f"val_{validator}"] = value
        for key, name, value, text in self._con.execute("SELECT key, name, value, text FROM extras ORDER BY key, name"):
            if key in out:
                out[key][f"x_{name}"] = text if text is not None else value
        return list(out.values())

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows())

    def get_meta(self, name: str) -> str | None:
        row = self._con.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    # ----------------------------------------------------------------- writes

    def set_meta(self, name: str, value: str) -> None:
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def write(self, record: dict[str, Any], scores: dict[str, float] | None = None) -> None:
        """Insert (or replace a failed) run and its scores in one transaction;
        ``scores.extras`` (a :class:`RunScores`) go to the ``extras`` table."""
        missing = [k for k, v in RUN_COLUMNS.items() if "NOT NULL" in v and record.get(k) is None]
        if missing:
            raise StoreError(f"run record lacks {missing}")
        values = [record.get(k) for k in RUN_COLUMNS]
        values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
        with self.transaction() as con:
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
        cur = self._con.execute("SELECT key, pair, seed, backbone, recipe, source_val_acc, wall_time_s, trained_by, "
                                "trained_at FROM source_models ORDER BY pair, seed, backbone")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

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
    with closing(RunStore(folder, create=False)) as st:
        st.dataframe().to_csv(out, index=False)
    return Path(out)
