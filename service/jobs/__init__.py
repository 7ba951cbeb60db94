"""Job orchestration: job records and their events, the stage pipeline a worker runs, dispatch to
the broker, the reconciler that re-sends lost stages, retention, the in-process background runner
and webhook delivery. Depends on ``service.store``; knows nothing of HTTP."""
