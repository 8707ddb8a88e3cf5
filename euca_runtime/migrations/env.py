"""Alembic environment for the per-instance databases (online mode only).

The store runs migrations with a connection it opened and began itself (see
`euca_runtime.store.db.migrate`), passed in `config.attributes["connection"]`, so the
whole upgrade is one transaction. Developer commands without a connection use the
`sqlalchemy.url` option set by `python -m euca_runtime.migrations --url URL`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import Connection

from euca_runtime.store.component import registered_components
from euca_runtime.store.models import CoreBase


def _target_metadata() -> list[MetaData]:
    return [CoreBase.metadata, *(spec.metadata for spec in registered_components().values())]


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=_target_metadata(),
        render_as_batch=True,  # SQLite needs table rebuilds for most ALTERs
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run with the caller's connection, or with one made from `sqlalchemy.url`."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: pass --url URL")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported; run against a database")
run_migrations_online()
