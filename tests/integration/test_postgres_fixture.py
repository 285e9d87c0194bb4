"""The `postgres_url` fixture gives a real, working PostgreSQL server reachable through SQLAlchemy and psycopg."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url)
    try:
        yield engine
    finally:
        engine.dispose()


def test_round_trip_through_sqlalchemy(engine: sa.Engine) -> None:
    assert engine.dialect.name == "postgresql"
    assert engine.dialect.driver == "psycopg"
    metadata = sa.MetaData()
    table = sa.Table(
        "fixture_round_trip",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("score", sa.Float),
    )
    metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=1, name="stop sign", score=0.97))
        with engine.connect() as conn:
            row = conn.execute(sa.select(table.c.name, table.c.score).where(table.c.id == 1)).one()
            version = conn.execute(sa.text("SELECT version()")).scalar_one()
            database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        assert tuple(row) == ("stop sign", 0.97)
        assert "PostgreSQL" in version
        assert database == "roadlabel"
    finally:
        metadata.drop_all(engine)


def test_two_connections_see_each_others_commits(engine: sa.Engine) -> None:
    metadata = sa.MetaData()
    table = sa.Table("fixture_visibility", metadata, sa.Column("id", sa.Integer, primary_key=True))
    metadata.create_all(engine)
    try:
        with engine.connect() as a, engine.connect() as b:
            assert a.connection.dbapi_connection is not b.connection.dbapi_connection
            a.execute(table.insert().values(id=1))
            # Not committed yet: b (READ COMMITTED, PostgreSQL's default) must not see it.
            assert b.execute(sa.select(table.c.id)).scalars().all() == []
            b.rollback()
            a.commit()
            assert b.execute(sa.select(table.c.id)).scalars().all() == [1]
            b.execute(table.insert().values(id=2))
            b.commit()
            assert a.execute(sa.select(table.c.id).order_by(table.c.id)).scalars().all() == [1, 2]
            a.rollback()
            pids = {c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for c in (a, b)}
            assert len(pids) == 2
    finally:
        metadata.drop_all(engine)
