"""tenants, API keys, jobs scoped to a tenant, Idempotency-Key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Jobs that exist before this revision belong to a tenant named "default" (the one the open,
loopback-only mode acts as), created here. Self-contained: no model imports.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
DEFAULT_TENANT = "default"


def _sqlite_foreign_keys_off() -> None:
    """SQLite cannot add a NOT NULL foreign key in place, so batch mode rebuilds ``jobs``:
    copy, DROP, rename. With foreign keys enforced, that DROP runs an implicit DELETE whose
    ON DELETE CASCADE would empty job_inputs, artifacts, stage_runs and job_events. The pragma
    only takes effect outside a transaction, which is where a real upgrade of a database that
    holds jobs starts (alembic's version bookkeeping has not written yet)."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    dbapi = bind.connection.dbapi_connection
    if getattr(dbapi, "in_transaction", False):
        # Only harmless when the tables are empty (a fresh database migrated in one run).
        if bind.execute(sa.text("SELECT count(*) FROM jobs")).scalar():
            raise RuntimeError("migration 0002 must start outside a transaction on SQLite when "
                               "jobs exist (it rebuilds the jobs table); run it on its own: "
                               "dare db upgrade 0002")
        return
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")


def _sqlite_check_foreign_keys() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        bad = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if bad:
            raise RuntimeError(f"foreign keys broken by migration 0002: {bad[:5]}")


def upgrade() -> None:
    _sqlite_foreign_keys_off()
    op.create_table(
        "tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name=op.f("fk_api_keys_tenant_id_tenants"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_prefix"), "api_keys", ["prefix"])

    default_id = uuid.uuid4()
    tenants = sa.table("tenants", sa.column("id", sa.Uuid()), sa.column("name", sa.String()),
                       sa.column("max_active_jobs", sa.Integer()), sa.column("created_at", TS))
    op.bulk_insert(tenants, [{"id": default_id, "name": DEFAULT_TENANT, "max_active_jobs": None,
                              "created_at": datetime.now(timezone.utc)}])

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
    jobs = sa.table("jobs", sa.column("tenant_id", sa.Uuid()))
    op.execute(jobs.update().values(tenant_id=default_id))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("tenant_id", existing_type=sa.Uuid(), nullable=False)
        batch.create_foreign_key(op.f("fk_jobs_tenant_id_tenants"), "tenants", ["tenant_id"],
                                 ["id"])
        batch.create_unique_constraint(op.f("uq_jobs_tenant_id_idempotency_key"),
                                       ["tenant_id", "idempotency_key"])
        batch.create_index("ix_jobs_tenant_id_created_at_id", ["tenant_id", "created_at", "id"])
    _sqlite_check_foreign_keys()


def downgrade() -> None:
    _sqlite_foreign_keys_off()
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_tenant_id_created_at_id")
        batch.drop_constraint(op.f("uq_jobs_tenant_id_idempotency_key"), type_="unique")
        batch.drop_constraint(op.f("fk_jobs_tenant_id_tenants"), type_="foreignkey")
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
        batch.drop_column("tenant_id")
    op.drop_index(op.f("ix_api_keys_prefix"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    _sqlite_check_foreign_keys()
