"""Migrations are versioned and idempotent."""

import asyncpg

from dropserver.db import migrate, migrate_database, migrations


async def test_migrate_twice_applies_nothing_new(clean_backends):
    conn = await asyncpg.connect(clean_backends.database_url)
    try:
        assert await migrate(conn) == []  # the session fixture applied everything
        versions = [r["version"] for r in
                    await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == [m.version for m in migrations()]
        tables = {r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        for needed in ("users", "drops", "drop_products", "orders", "payments",
                       "webhook_events", "campaign_backers", "investor_stakes",
                       "ledger_entries", "payouts", "chat_moderation",
                       "stream_sessions", "replays"):
            assert needed in tables
    finally:
        await conn.close()


async def test_migrate_database_on_an_empty_database_then_again(clean_backends):
    admin = await asyncpg.connect(clean_backends.database_url)
    try:
        await admin.execute("DROP DATABASE IF EXISTS migrate_fresh")
        await admin.execute("CREATE DATABASE migrate_fresh")
        fresh = clean_backends.database_url.rsplit("/", 1)[0] + "/migrate_fresh"
        assert await migrate_database(fresh) == [m.version for m in migrations()]
        assert await migrate_database(fresh) == []
    finally:
        await admin.execute("DROP DATABASE IF EXISTS migrate_fresh WITH (FORCE)")
        await admin.close()


async def test_money_and_states_are_constrained(clean_backends):
    conn = await asyncpg.connect(clean_backends.database_url)
    try:
        await conn.execute("INSERT INTO users (id, role) VALUES ('c1', 'creator')")
        drop_id = await conn.fetchval(
            "INSERT INTO drops (creator_id, title) VALUES ('c1', 'd') RETURNING id")
        try:
            await conn.execute("UPDATE drops SET state = 'exploded' WHERE id = $1", drop_id)
        except asyncpg.CheckViolationError:
            pass
        else:
            raise AssertionError("an unknown state was accepted")
        try:
            await conn.execute(
                "UPDATE drops SET split_creator_bps = 9000 WHERE id = $1", drop_id)
        except asyncpg.CheckViolationError:
            pass
        else:
            raise AssertionError("a split that does not sum to 100% was accepted")
    finally:
        await conn.close()
