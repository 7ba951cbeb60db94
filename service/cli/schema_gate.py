"""Every server subcommand that touches the database refuses to start on an outdated schema (exit
2 with the upgrade command to run). Shared by ``main`` and ``keys``, so neither imports the other."""
from __future__ import annotations

import sys


def schema_or_exit(settings) -> None:  # noqa: ANN001
    from service.store.db import SchemaOutdated, check_schema, make_engine

    engine = make_engine(settings.database_url)
    try:
        check_schema(engine)
    except SchemaOutdated as e:
        print(f"dare: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        engine.dispose()
