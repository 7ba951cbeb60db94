"""The ``dare`` command.

    dare serve [--port P]     API + one worker on the embedded defaults (SQLite, filesystem broker,
                              ./var); migrates the SQLite database itself
    dare api                  the API alone (production; configured by DARE_* variables)
    dare worker               one Celery worker on the gpu queue (production)
    dare db upgrade|current   migrations (the only way the schema changes)
    dare keys create|list|revoke   API keys (service.cli.keys); create prints the key once
    dare reconcile [--once]   re-send stages lost with a worker or the broker (the API does this
                              every DARE_RECONCILE_INTERVAL_S already)
    dare harden / train-reference   the engine's own commands (worker.cli), when installed
    dare submit|status|watch|list|cancel|download   the API from a terminal (dare_client.cli)
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from service.cli.schema_gate import schema_or_exit


def worker_argv(queue: str = "gpu", concurrency: int = 1, loglevel: str = "INFO",
                extra: Sequence[str] = ()) -> list[str]:
    """The worker command line; docker-compose.yml and the tests run exactly this."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue,
            "-c", str(concurrency), "--loglevel", loglevel, "--without-mingle", "--without-gossip",
            *extra]


def _thread_env() -> None:
    # One PyTorch thread per process unless told otherwise (DESIGN.md: two processes with two
    # threads each on two cores slow each other down tenfold).
    threads = os.environ.get("DARE_TORCH_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: the embedded worker gets SIGTERM if `dare serve` dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.logs import uvicorn_log_config
    from service.settings import get_settings
    from service.store.db import upgrade

    if args.home:
        os.environ["DARE_HOME"] = args.home
    _thread_env()
    get_settings.cache_clear()
    settings = get_settings()
    settings.ensure_dirs()
    host = args.host or settings.host
    if _is_loopback(host) and "DARE_AUTH" not in os.environ:
        # Only this machine can reach a loopback port: keys would only get in the way.
        settings = settings.model_copy(update={"auth": "open"})
    if settings.is_sqlite:
        upgrade(settings.database_url)  # embedded mode only: production runs `dare db upgrade`
    else:
        schema_or_exit(settings)
    worker = subprocess.Popen(worker_argv(settings.queue, 1, args.worker_loglevel),
                              preexec_fn=_die_with_parent)
    port = args.port or settings.port
    print(f"dare serve: API on http://{args.host or settings.host}:{port} (docs: /docs), "
          f"worker pid {worker.pid}, data in {settings.home}", flush=True)
    print(_auth_line(settings.auth, host, settings.home), flush=True)
    try:
        uvicorn.run(create_app(settings), host=args.host or settings.host, port=port,
                    log_level=settings.log_level,
                    log_config=uvicorn_log_config(settings.log_format, settings.log_level))
    finally:
        worker.terminate()  # warm shutdown: the running stage's message is not acked, so it
        try:                # is delivered again on the next start
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_line(auth: str, host: str, home: object) -> str:
    if auth == "open" and _is_loopback(host):
        return (f"dare serve: the API is open (no authentication) on loopback {host}: every "
                "request acts as tenant 'default'. Set DARE_AUTH=required to use API keys.")
    if auth == "open":
        return (f"dare serve: WARNING: DARE_AUTH=open on {host}: anyone who can reach this port "
                "can use the API without a key.")
    return (f"dare serve: authentication is required on {host}: create a key with "
            f"`DARE_HOME={home} dare keys create --tenant NAME` and send "
            "`Authorization: Bearer <key>`.")


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.logs import uvicorn_log_config
    from service.settings import get_settings

    settings = get_settings()
    schema_or_exit(settings)
    uvicorn.run("service.api.app:create_app", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, workers=args.workers,
                log_level=settings.log_level, proxy_headers=True,
                # applied again in each --workers process: JSON lines with request/job ids
                log_config=uvicorn_log_config(settings.log_format, settings.log_level))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    _thread_env()
    settings = get_settings()
    schema_or_exit(settings)
    argv = worker_argv(settings.queue, args.concurrency, args.loglevel, args.celery_args)
    os.execv(argv[0], argv)
    return 0  # pragma: no cover


def cmd_reconcile(args: argparse.Namespace) -> int:
    import json
    import time

    from service.jobs.dispatch import CeleryDispatcher
    from service.jobs.reconciler import reconcile_once
    from service.settings import get_settings
    from service.store.db import engine_for, session_factory

    settings = get_settings()
    schema_or_exit(settings)
    factory = session_factory(engine_for(settings.database_url))
    dispatcher = CeleryDispatcher(settings)
    interval = args.interval or settings.reconcile_interval_s or 15.0
    while True:
        print(json.dumps(reconcile_once(settings, factory, dispatcher), sort_keys=True), flush=True)
        if args.once:
            return 0
        time.sleep(interval)


def cmd_db(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from service.store.db import (
        current_revision,
        downgrade,
        head_revision,
        make_engine,
        upgrade,
    )

    settings = get_settings()
    settings.ensure_dirs()
    if args.db_command == "upgrade":
        upgrade(settings.database_url, args.revision)
    elif args.db_command == "downgrade":
        downgrade(settings.database_url, args.revision)
    engine = make_engine(settings.database_url)
    try:
        print(f"database revision: {current_revision(engine)} (code head: {head_revision()})")
    finally:
        engine.dispose()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The server subcommands; the ``dare`` command (``dare_client.cli``) finds this through the
    ``dare.commands`` entry-point group (pyproject.toml)."""
    from service.cli import keys as keys_cli

    keys_cli.register(sub)  # keys create|list|revoke

    p = sub.add_parser("serve", help="API + one worker on embedded defaults (SQLite, no broker server)")
    p.add_argument("--port", type=int, default=None, help="default 8000 (DARE_PORT)")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (DARE_HOST)")
    p.add_argument("--home", default=None, help="data directory (DARE_HOME, default ./var)")
    p.add_argument("--worker-loglevel", default="WARNING")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="the API alone (configure with DARE_* variables)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="one Celery worker on the gpu queue (-c 1 per GPU)")
    p.add_argument("--concurrency", "-c", type=int, default=1)
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed on to celery worker")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("reconcile", help="re-send stages whose worker or message was lost")
    p.add_argument("--once", action="store_true", help="one pass, print what it did, exit")
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between passes (default DARE_RECONCILE_INTERVAL_S)")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("db", help="database migrations")
    dsub = p.add_subparsers(dest="db_command", required=True)
    d = dsub.add_parser("upgrade", help="migrate to the newest schema (alembic upgrade head)")
    d.add_argument("revision", nargs="?", default="head")
    dsub.add_parser("current", help="print the schema revision")
    d = dsub.add_parser("downgrade", help="migrate down to REVISION (base: drop everything)")
    d.add_argument("revision")
    p.set_defaults(func=cmd_db)


def build_parser() -> argparse.ArgumentParser:
    """``dare`` with every subcommand, also when this checkout is not installed (no entry points):
    the client's, the engine's and the server's."""
    from dare_client.cli import build_parser as client_parser

    from service.cli import main as server  # this module by its name, also under `python -m`
    from worker import cli as engine_cli

    return client_parser(extra=(engine_cli.register, server.register))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
