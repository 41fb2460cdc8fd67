"""The database layer: schema versions, migrations, connection settings."""

from __future__ import annotations

import sqlite3

import pytest

import mkat


def test_a_fresh_database_gets_the_schema_at_the_current_version(tmp_path):
    db = mkat.Database(str(tmp_path / "fresh.db"))
    # It should record the version, use WAL and enforce foreign keys on every connection
    assert db.migrated_from == 0
    for run in (db.read, db.write):
        assert run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == mkat.SCHEMA_VERSION
        assert run(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
        assert run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    assert db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    db.close()


def test_reads_share_a_few_connections_whatever_the_number_of_threads(tmp_path):
    import threading

    db = mkat.Database(str(tmp_path / "pool.db"))
    seen, start = set(), threading.Barrier(16)

    def read():
        start.wait()
        for _ in range(20):
            db.read(lambda c: seen.add(id(c)) or c.execute("SELECT count(*) FROM services").fetchone())

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= len(seen) <= mkat.READ_CONNECTIONS
    db.close()


def test_an_older_database_gets_the_missing_migrations_in_order(tmp_path, monkeypatch):
    path = str(tmp_path / "old.db")
    mkat.Database(path).close()
    monkeypatch.setattr(mkat, "SCHEMA_VERSION", mkat.SCHEMA_VERSION + 2)
    monkeypatch.setattr(
        mkat,
        "MIGRATIONS",
        [
            (mkat.SCHEMA_VERSION - 1, "ALTER TABLE services ADD COLUMN note TEXT;"),
            (mkat.SCHEMA_VERSION, "UPDATE services SET note = 'second ran after first';"),
        ],
    )
    db = mkat.Database(path)
    assert db.migrated_from == mkat.SCHEMA_VERSION - 2
    assert db.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == mkat.SCHEMA_VERSION
    columns = db.read(lambda c: [row[1] for row in c.execute("PRAGMA table_info(services)")])
    assert "note" in columns
    db.close()


def test_a_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = str(tmp_path / "old.db")
    mkat.Database(path).close()
    monkeypatch.setattr(mkat, "SCHEMA_VERSION", mkat.SCHEMA_VERSION + 1)
    monkeypatch.setattr(
        mkat,
        "MIGRATIONS",
        [(mkat.SCHEMA_VERSION, "ALTER TABLE services ADD COLUMN note TEXT; SELECT * FROM no_such_table;")],
    )
    with pytest.raises(sqlite3.OperationalError):
        mkat.Database(path)
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == mkat.SCHEMA_VERSION - 1
    assert "note" not in [row[1] for row in c.execute("PRAGMA table_info(services)")]
    c.close()


def test_a_database_from_a_newer_mkat_is_refused(tmp_path):
    path = str(tmp_path / "new.db")
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {mkat.SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(sqlite3.DatabaseError, match="made by a newer mkat"):
        mkat.Database(path)


def test_a_second_mkat_on_the_same_database_is_refused(tmp_path):
    path = str(tmp_path / "one.db")
    first = mkat.Database(path)
    with pytest.raises(sqlite3.OperationalError, match="another mkat is already using this database"):
        mkat.Database(path)
    first.close()
    # It should let go when closed
    mkat.Database(path).close()
