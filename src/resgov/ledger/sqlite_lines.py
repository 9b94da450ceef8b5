"""The SQLite writer's copy of the budget lines it touches, written back once per batch.

Every reserve and settle reads and moves the same few lines (an agent's and its org's).
Reading each line with a SELECT and rewriting it with an UPDATE per operation cost most of
the ledger's statements; instead the writer keeps the lines it has seen in memory, moves
them there, and writes each line touched by a batch once, just before the batch commits.

The copy is only trusted while no other connection has written the file: ``PRAGMA
data_version`` (checked under the write lock at the start of every batch) changes when one
has (``resgov store migrate``, a second process), and the copy is then dropped. It is also
dropped whenever a batch fails to commit, so it never holds a state the file does not.

Every write to ``budget_line`` by the store goes through here.
"""

from __future__ import annotations

import sqlite3

from resgov.core.budget import LineState

_SELECT = "SELECT spent, reserved FROM budget_line WHERE org = ? AND key = ?"
_UPSERT = (
    "INSERT INTO budget_line (org, key, spent, reserved) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (org, key) DO UPDATE SET spent = excluded.spent, reserved = excluded.reserved"
)


class LineCache:
    """Budget line states as of the open transaction, with the ones it changed."""

    __slots__ = ("_dirty", "_states", "_version")

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], LineState | None] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._version: int | None = None

    def begin(self, conn: sqlite3.Connection) -> None:
        """Under the write lock, before a batch: forget everything if another connection wrote."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._states.clear()
            self._dirty.clear()
            self._version = version

    def get(self, conn: sqlite3.Connection, org: str, key: str) -> LineState | None:
        """The line's state, or None when it has no row yet."""
        k = (org, key)
        try:
            return self._states[k]
        except KeyError:
            row = conn.execute(_SELECT, k).fetchone()
            state = LineState(row[0], row[1]) if row else None
            self._states[k] = state
            return state

    def put(self, org: str, key: str, state: LineState) -> None:
        """Record a new state; it is written with the batch."""
        k = (org, key)
        self._states[k] = state
        self._dirty.add(k)

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write every line changed since the last flush (inside the batch's transaction)."""
        if self._dirty:
            states = self._states
            rows = []
            for k in self._dirty:
                state = states[k]
                assert state is not None
                rows.append((k[0], k[1], state.spent, state.reserved))
            conn.executemany(_UPSERT, rows)
            self._dirty.clear()

    def drop(self) -> None:
        """Forget everything (a batch rolled back or failed to commit)."""
        self._states.clear()
        self._dirty.clear()
        self._version = None
