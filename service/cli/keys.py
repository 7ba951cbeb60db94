"""``dare keys create|list|revoke``: API keys, run by an operator against the service's database
(DARE_DATABASE_URL, or the embedded SQLite under DARE_HOME)."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="API keys: create (printed once), list, revoke")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = ksub.add_parser("create", help="a new key for a tenant (created if new); printed once")
    c.add_argument("--tenant", required=True, help="tenant name: letters, digits, . _ -")
    c.add_argument("--max-active-jobs", type=int, default=None, metavar="N",
                   help="this tenant's limit of queued+running jobs (default: "
                        "DARE_MAX_ACTIVE_JOBS_PER_TENANT)")
    ksub.add_parser("list", help="every key: prefix, tenant, created, last used, revoked")
    r = ksub.add_parser("revoke", help="revoke the key with this prefix (as `keys list` shows)")
    r.add_argument("prefix")
    p.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    from service.api.auth import (
        InvalidTenantName,
        KeyNotFound,
        create_api_key,
        list_keys,
        revoke,
    )
    from service.cli.schema_gate import schema_or_exit
    from service.settings import get_settings
    from service.store.db import make_engine, session_factory, session_scope

    settings = get_settings()
    schema_or_exit(settings)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(session_factory(engine)) as s:
            if args.keys_command == "create":
                if args.max_active_jobs is not None and args.max_active_jobs < 1:
                    print("dare keys: --max-active-jobs must be at least 1", file=sys.stderr)
                    return 2
                key = create_api_key(s, args.tenant, max_active_jobs=args.max_active_jobs)
                # The key alone on the first line, so `dare keys create ... | head -1` works.
                print(key)
                print(f"# API key for tenant {args.tenant!r}. Store it now: only its hash is kept, "
                      "it cannot be shown again.", file=sys.stderr)
            elif args.keys_command == "list":
                rows = list_keys(s)
                print(f"{'PREFIX':<18}{'TENANT':<24}{'CREATED':<22}{'LAST USED':<22}REVOKED")
                for key, tenant in rows:
                    print(f"{'dare_' + key.prefix:<18}{tenant:<24}{_t(key.created_at):<22}"
                          f"{_t(key.last_used_at):<22}{_t(key.revoked_at)}")
            else:
                key = revoke(s, args.prefix)
                print(f"revoked dare_{key.prefix} (requests with it answer 401 within 5 s: API processes cache a checked key that long)")
    except InvalidTenantName as e:
        print(f"dare keys: {e}", file=sys.stderr)
        return 2
    except KeyNotFound as e:
        print(f"dare keys: {e.args[0]}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


def _t(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"
