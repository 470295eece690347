"""Admin commands: `python -m app migrate | purge-traces`."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from app.config import ConfigError, Settings
from app.db import Database, DatabaseError, DatabaseUnavailable, migrate
from app.traces.store import TraceStore


def main(argv: list[str] | None = None) -> int:
    """Run one admin command; exit status 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply sql/ migrations (idempotent, safe concurrently)")
    purge = sub.add_parser("purge-traces", help="delete traces older than the retention period")
    purge.add_argument("--days", type=int, help="override AUTOMAGIK_OMNI_TRACE_RETENTION_DAYS")
    purge.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    purge.add_argument("--batch", type=int, default=5000, help="rows per delete transaction")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(require_api_key=False)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            applied = migrate(settings.database_url)
            print(json.dumps({"applied": applied}))
            return 0
        days = args.days if args.days is not None else settings.trace_retention_days
        if days < 0:
            print("--days must be 0 or more", file=sys.stderr)
            return 2
        if args.batch < 1:
            # A batch of 0 would never finish (each pass deletes nothing and goes on).
            print("--batch must be 1 or more", file=sys.stderr)
            return 2
        store = TraceStore(Database(settings.database_url, size=1))
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)
        if args.dry_run:
            print(json.dumps({"would_delete": store.count_older_than(cutoff), "older_than_days": days}))
        else:
            n = store.delete_older_than(cutoff, args.batch, exclusive=False)
            print(json.dumps({"deleted": n, "older_than_days": days}))
        return 0
    except (DatabaseUnavailable, DatabaseError) as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
