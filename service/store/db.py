"""Engines, sessions and the schema-version check. Migrations themselves live in ``alembic/``."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic_core import from_json
from sqlalchemy import Engine, create_engine, event, exc, inspect
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = REPO_ROOT / "alembic.ini"


def _alembic_dir() -> Path:
    """The checkout's ``alembic/``; an installed wheel carries the same folder as the package
    ``service.store.migrations`` (pyproject.toml maps one onto the other)."""
    checkout = REPO_ROOT / "alembic"
    if (checkout / "env.py").exists():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("service.store.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations are missing: neither alembic/ beside the code nor the "
                           "package service.store.migrations is present; reinstall dare-service")
    return Path(list(spec.submodule_search_locations)[0])


ALEMBIC_DIR = _alembic_dir()


class SchemaOutdated(RuntimeError):
    """The database is not at the code's migration head; the message says what to run."""


SQLITE_BUSY_TIMEOUT_S = 30  # how long a SQLite writer waits for another's lock before failing


def make_engine(url: str, *, begin_immediate: bool = True) -> Engine:
    """``begin_immediate=False`` only for migrations (see :func:`_migrate`) and for the API's
    one-statement reads on SQLite (``service.api.deps.AppContext.read_engine``), which write nothing."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": SQLITE_BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            # pysqlite's own transaction handling is off: it sends BEGIN only before the first
            # INSERT/UPDATE, so a read and the write that depends on it ran in two transactions
            # (a claim could read "queued", a cancel commit, the claim write "running").
            if begin_immediate:
                dbapi_conn.isolation_level = None
            # WAL lets the API read while the worker writes; the foreign keys make CASCADE real.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        def _begin_immediate(conn) -> None:  # noqa: ANN001
            # SQLite has no row locks (FOR UPDATE compiles to nothing): every transaction takes
            # the database's write lock when it begins, so read-then-write is atomic, and a
            # second writer waits (busy_timeout) at BEGIN instead of failing at its first write
            # when its snapshot is stale. Transactions are short (the request session ends with
            # the route, see service.api.deps), so readers wait milliseconds at most.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        if begin_immediate:
            event.listen(engine, "begin", _begin_immediate)

        return engine
    # Up to 15 connections as before, but 10 of them kept: with pool_size=5, eight requests at
    # once (a few polling clients) overflowed, and every overflow connection was closed when it
    # came back and opened again for the next request (a PostgreSQL backend started per read).
    # jsonb values are parsed by pydantic-core's JSON parser (twice as fast as json.loads on a
    # job's config; the same Python values): a page of 20 jobs parses 40 of them.
    engine = create_engine(url, pool_size=10, max_overflow=5, json_deserializer=from_json)
    _ping_when_idle(engine)
    return engine


# A pooled connection that has been idle this long is pinged before use (a restarted or
# failed-over server, a proxy's idle timeout); a busier one is not. SQLAlchemy's pool_pre_ping
# would ping on every checkout: a round trip added to every request.
PING_IDLE_AFTER_S = 10.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_conn, record) -> None:  # noqa: ANN001
        record.info["dare_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy) -> None:  # noqa: ANN001
        since = record.info.get("dare_idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_AFTER_S:
            return  # new, or used a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception:
            alive = False
        if not alive:
            # The pool discards this connection and checks out (connects) another.
            raise exc.DisconnectionError("a pooled connection failed its ping")


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def engine_for(url: str) -> Engine:
    """One engine per URL and process (the worker's pipeline and its failure hook share it)."""
    with _ENGINES_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = make_engine(url)
        return _ENGINES[url]


def dispose_engines(*, close: bool = True) -> None:
    """Forget pooled connections. In a forked child call it with ``close=False``: the sockets
    belong to the parent, and closing them from the child would break the parent's."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose(close=close)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# --- migrations ---------------------------------------------------------------------------

def alembic_config(url: str):  # noqa: ANN201 (alembic.config.Config)
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    # Escape '%' for configparser (URL-encoded passwords).
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(ALEMBIC_DIR))
    head = script.get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _migrate(url: str, step, revision: str) -> None:  # noqa: ANN001 (an alembic command)
    """Run an alembic command on a connection that keeps pysqlite's lazy BEGIN: migration 0002
    switches SQLite's foreign keys off, which only works outside a transaction, and a BEGIN
    IMMEDIATE before alembic's first read would open one. Migrations run alone (``dare serve``
    before it starts the worker; ``dare db upgrade`` in production), so no lock is needed."""
    cfg = alembic_config(url)
    engine = make_engine(url, begin_immediate=False)
    try:
        with engine.connect() as connection:
            cfg.attributes["connection"] = connection  # alembic/env.py uses it as given
            step(cfg, revision)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    _migrate(url, command.upgrade, revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _migrate(url, command.downgrade, revision)


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaOutdated` unless the database is at the migration head."""
    head = head_revision()
    try:
        current = current_revision(engine)
    except Exception as e:  # unreachable database: say so plainly
        raise SchemaOutdated(f"cannot read the schema version from the database: {e}") from e
    if current == head:
        return
    where = "empty (no tables)" if current is None and not inspect(engine).get_table_names() \
        else f"at revision {current}"
    raise SchemaOutdated(
        f"the database schema is {where}, this code needs revision {head}: "
        "run `alembic upgrade head` (or `dare db upgrade`) with the same DARE_DATABASE_URL")
