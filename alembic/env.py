"""Alembic environment: URL and metadata come from the service, never from alembic.ini."""
from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from service.settings import get_settings
from service.store.db import make_engine
from service.store.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    # service.store.db.alembic_config() sets it for programmatic runs; the CLI takes the settings.
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _configure(**kw) -> None:  # noqa: ANN003
    url = kw.get("url") or kw["connection"].engine.url.render_as_string(hide_password=False)
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=str(url).startswith("sqlite"),  # SQLite cannot ALTER most things
        compare_type=True,
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
