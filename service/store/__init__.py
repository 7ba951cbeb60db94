"""Persistence: the database engine and migrations (``db``), the ORM tables (``models``) and the
artifact stores, local disk or S3 (``storage``). Imports nothing of the other service packages."""
