"""PostgreSQL: the asyncpg pool and versioned, idempotent migrations."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

__all__ = ["Migration", "create_pool", "migrate", "migrate_database", "migrations",
           "schema_path"]

log = logging.getLogger("dropserver.db")

_HERE = Path(__file__).resolve().parent
_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant: serialises concurrent `migrate` runs (several workers, several nodes).
_LOCK_ID = 0x64726F70  # "drop"


def schema_path() -> Path:
    """``schema.sql`` at the repository root, or the copy inside the wheel."""
    for candidate in (_HERE.parent / "schema.sql", _HERE / "schema.sql"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("schema.sql not found beside the dropserver package")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    found = [Migration(1, "schema.sql", schema_path().read_text())]
    for path in sorted((_HERE / "migrations").glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if not match:
            raise ValueError(f"bad migration file name: {path.name}")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions) or versions != sorted(versions):
        raise ValueError(f"migration versions must be unique and ascending: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations not yet applied; return their versions. Idempotent."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    INT PRIMARY KEY,
                   name       TEXT NOT NULL,
                   checksum   TEXT NOT NULL,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {r["version"]: r["checksum"] for r in
                await conn.fetch("SELECT version, checksum FROM schema_migrations")}
        for mig in migrations():
            if mig.version in done:
                if done[mig.version] != mig.checksum and mig.version != 1:
                    log.warning("migration changed after it was applied",
                                extra={"version": mig.version, "migration": mig.name})
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)", mig.version, mig.name, mig.checksum)
            applied_now.append(mig.version)
            log.info("applied migration", extra={"version": mig.version,
                                                 "migration": mig.name})
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now


async def migrate_database(dsn: str) -> list[int]:
    """:func:`migrate` over a connection of its own, closed afterwards."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection,
        command_timeout=30,
    )
