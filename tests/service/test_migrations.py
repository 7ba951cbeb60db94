"""Alembic is the only way the schema changes: up to head and back to base on SQLite and on
PostgreSQL, the head matches the models, and the app refuses an old schema."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.store.db import (
    SchemaOutdated,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from service.store.models import Base

from .conftest import PG_ADMIN_URL, PG_HOST, REPO, service_env

TABLES = {"jobs", "job_inputs", "artifacts", "stage_runs", "job_events", "tenants", "api_keys"}


@pytest.fixture
def scratch_pg():
    name = f"dare_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+psycopg://{PG_HOST}/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("scratch_pg")


def test_upgrade_to_head_matches_models_then_downgrade_to_base(db_url):
    engine = make_engine(db_url)
    try:
        with pytest.raises(SchemaOutdated, match="alembic upgrade head"):
            check_schema(engine)
        upgrade(db_url)
        assert current_revision(engine) == head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        check_schema(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        downgrade(db_url, "base")
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(db_url)  # and up again: downgrade left nothing behind
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_0002_gives_existing_jobs_the_default_tenant_and_keeps_their_rows(db_url):
    """0002 rebuilds `jobs` on SQLite; with foreign keys on, a careless rebuild would cascade-
    delete every job's inputs. Up and down with a job in place, on both backends."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    jid = uuid.uuid4()
    job_id = jid.hex if db_url.startswith("sqlite") else str(jid)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO jobs (id, status, config, stages, model_format, "
                           "stage_progress, progress, created_at, updated_at) VALUES (:i, 'queued', "
                           "'{}', '[]', 'onnx', 0, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"),
                      {"i": job_id})
            c.execute(text("INSERT INTO job_inputs (job_id, field, filename, uri, size, sha256) "
                           "VALUES (:i, 'model', 'm.onnx', 'file:///x', 1, 'ab')"), {"i": job_id})
        engine.dispose()
        upgrade(db_url, "0002")
        with engine.connect() as c:
            tenant = c.execute(text("SELECT t.name FROM jobs j JOIN tenants t ON t.id = j.tenant_id"
                                    )).scalars().all()
            assert tenant == ["default"]
            assert c.execute(text("SELECT count(*) FROM job_inputs")).scalar() == 1
        fks = inspect(engine).get_foreign_keys("jobs")
        assert [fk["referred_table"] for fk in fks] == ["tenants"]
        assert {c["name"]: c["nullable"] for c in inspect(engine).get_columns("jobs")}["tenant_id"] \
            is False
        engine.dispose()
        upgrade(db_url)  # through 0003 (webhooks) and back with the job in place
        engine.dispose()
        downgrade(db_url, "0002")
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
            assert c.execute(text("SELECT count(*) FROM tenants")).scalar() == 1
        assert "webhook_secret" not in {c["name"] for c in inspect(engine).get_columns("tenants")}
        engine.dispose()
        downgrade(db_url, "0001")
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
            assert c.execute(text("SELECT count(*) FROM job_inputs")).scalar() == 1
        assert "tenant_id" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        assert not {"tenants", "api_keys"} & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_app_refuses_to_start_on_an_old_schema(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    s = Settings(home=tmp_path)  # a fresh SQLite file: no tables
    with pytest.raises(SchemaOutdated, match=r"alembic upgrade head.*dare db upgrade"):
        with TestClient(create_app(s)):
            pass


def test_dare_api_exits_with_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli.main", "api", "--port", "1"], cwd=REPO,
                       env=service_env(DARE_HOME=str(tmp_path)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "alembic upgrade head" in r.stderr and "dare db upgrade" in r.stderr
    assert "Traceback" not in r.stderr


def test_dare_db_upgrade_is_the_migrate_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli.main", "db", "upgrade"], cwd=REPO,
                       env=service_env(DARE_HOME=str(tmp_path)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"database revision: {head_revision()}" in r.stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'dare.db'}")
    check_schema(engine)
    engine.dispose()
