"""The HTTP edge: the FastAPI app, its routes and dependencies, authentication, the checks an
upload passes before it is stored (limits, inspection, idempotency, quotas, admission) and the
problem+json errors. Depends on ``service.jobs`` and ``service.store``; nothing below imports it."""
