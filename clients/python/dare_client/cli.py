"""``dare submit | status | watch | list | cancel | download``: the API from a terminal, built on
:class:`dare_client.client.DareClient`. This module is the ``dare`` command: the server's
subcommands (``serve``, ``worker``, ``keys``, ``harden``, ...) join it through the ``dare.commands``
entry-point group when the service is installed, so one command works whichever is installed.

Progress bars (tqdm) go to stderr and only on a terminal; the job's events and results go to
stdout, one line each, so the output reads the same in a log file or a CI job.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from dare_client.client import (
    DEFAULT_URL,
    ApiError,
    ClientError,
    DareClient,
    DownloadError,
    ServerUnreachable,
)
from dare_client.schemas import EventRead, JobRead, JobStatus

# Exit codes, distinct so scripts can tell a refused request from a job that ran and failed.
EXIT_OK = 0
EXIT_API_ERROR = 1      # the API refused the request (its problem detail is printed)
EXIT_USAGE = 2          # bad arguments (argparse's own code too)
EXIT_JOB_FAILED = 3     # the job ended failed (its error code and message are printed)
EXIT_JOB_CANCELLED = 4  # the job ended cancelled
EXIT_UNREACHABLE = 5    # no answer from the server
EXIT_DOWNLOAD = 6       # an artifact did not match its size or sha256 (nothing was kept)

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  ok (for status/watch/submit --wait: the job is not failed or cancelled)
  {EXIT_API_ERROR}  the API refused the request; its problem detail is printed
  {EXIT_USAGE}  bad arguments
  {EXIT_JOB_FAILED}  the job failed; its error code and message are printed
  {EXIT_JOB_CANCELLED}  the job was cancelled
  {EXIT_UNREACHABLE}  the server did not answer (wrong --url, or not running)
  {EXIT_DOWNLOAD}  a downloaded artifact did not match its sha256 (nothing was kept)

environment: DARE_URL (default {DEFAULT_URL}), DARE_API_KEY"""


class UsageError(Exception):
    pass


# --- output ---------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def job_line(job: JobRead) -> str:
    st = job.stage
    where = f"[{(st.index or 0) + 1}/{st.total}] {st.name or '-'} {_pct(st.progress)}"
    return f"{job.id}  {job.status.value:<10} {where:<22} overall {_pct(job.progress)}"


def error_line(job: JobRead) -> str:
    if job.error is None:
        return f"job {job.id} {job.status.value}"
    where = f" in stage {job.error.stage}" if job.error.stage else ""
    return f"job {job.id} {job.status.value}{where}: {job.error.code}: {job.error.message}"


def summary_lines(result: dict[str, Any] | None) -> list[str]:
    """The headline numbers of a succeeded job's result (a summary of report.json)."""
    res = result or {}
    lines: list[str] = []
    ca = res.get("clean_accuracy") or {}
    if ca:
        lines.append(f"clean accuracy: {ca.get('original', 0):.3f} -> {ca.get('hardened', 0):.3f} "
                     f"(within the {ca.get('budget', 0):.0%} budget: {ca.get('within_budget')})")
    if res.get("attacks"):
        w = max(8, *(len(n) for n in res["attacks"]))  # "autoattack" is ten characters
        lines.append(f"{'attack':<{w}}{'original':>10}{'transfer ER':>13}{'adaptive':>10}")
        for name, a in res["attacks"].items():
            lines.append(f"{name:<{w}}{a.get('original_accuracy', 0):>10.3f}"
                         f"{a.get('transfer_er', 0):>13.3f}{a.get('adaptive_accuracy', 0):>10.3f}")
    if res.get("stage_durations_s"):
        lines.append("stage times (s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in res["stage_durations_s"].items()))
    return lines


def event_line(e: EventRead) -> str | None:
    """One line per event; ``None`` for the ones not worth a line of their own."""
    at = e.at.astimezone().strftime("%H:%M:%S")
    d = e.data or {}
    if e.kind == "created":
        text = f"created; stages: {', '.join(d.get('stages', []))}"
    elif e.kind == "stage_started":
        attempt = d.get("attempt")
        text = f"{e.stage} started" + (f" (attempt {attempt})" if attempt and attempt > 1 else "")
    elif e.kind == "progress":
        text = f"{e.stage} {_pct(float(d.get('progress', 0)))}"
    elif e.kind == "stage_finished":
        arts = d.get("artifacts") or []
        text = f"{e.stage} finished in {d.get('duration_s', 0):.1f} s" + \
            (f"; artifacts: {', '.join(arts)}" if arts else "")
    elif e.kind == "failed":
        text = f"failed{' in ' + e.stage if e.stage else ''}: {d.get('code', '')} {d.get('message', '')}".rstrip()
    else:  # cancel_requested, cancelled, succeeded, and kinds added later (e.g. webhooks)
        text = e.kind.replace("_", " ") + (f" ({e.stage})" if e.stage else "") + \
            (f" {json.dumps(d, separators=(',', ':'))}" if d else "")
    return f"{at}  {text}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Bars:
    """tqdm bars on stderr keyed by name (upload fields, artifacts, the current stage); inert
    when stderr is not a terminal or bars are turned off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and _isatty(sys.stderr)
        self._bars: dict[str, Any] = {}

    def transfer(self, name: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(name)
        if bar is None:
            bar = self._bars[name] = tqdm(total=total, desc=name, unit="B", unit_scale=True,
                                          unit_divisor=1024, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            self.close(name)

    def stage(self, job: JobRead) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        st = job.stage
        key = f"stage:{st.index}:{st.name}"
        for k in [k for k in self._bars if k.startswith("stage:") and k != key]:
            self.close(k)
        if job.status.is_terminal():
            self.close(key)
            return
        bar = self._bars.get(key)
        if bar is None:
            desc = f"[{(st.index or 0) + 1}/{st.total}] {st.name}"
            bar = self._bars[key] = tqdm(total=100, desc=desc, unit="%", file=sys.stderr,
                                         leave=False, bar_format="{desc:<16} {bar} {n:.0f}% {elapsed}")
        bar.n = round(100 * st.progress)
        bar.refresh()

    def write(self, line: str) -> None:
        if self._bars:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self, name: str | None = None) -> None:
        for k in [name] if name is not None else list(self._bars):
            bar = self._bars.pop(k, None)
            if bar is not None:
                bar.close()


# --- commands -------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> DareClient:
    return DareClient(args.url, api_key=args.key or None, timeout=args.timeout)


PREFIX_SCAN = 1000  # how many of the newest jobs a short id is looked up among


def _resolve(client: DareClient, text: str) -> str:
    """A full job id as given; a shorter one (the ``dare-<prefix>`` directories use 8
    characters) is looked up among the caller's newest jobs, and must match exactly one."""
    text = text.strip().lower()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    if len(text) < 4 or not all(c in "0123456789abcdef-" for c in text):
        raise UsageError(f"{text!r} is not a job id: give the id `dare submit` printed (a UUID), "
                         "or at least its first 4 characters")
    hits = [str(j.id) for j in client.iter_jobs(page_size=200, max_items=PREFIX_SCAN)
            if str(j.id).startswith(text)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ApiError(404, "job_not_found", f"no job id starts with {text!r} among your newest "
                       f"{PREFIX_SCAN} jobs; `dare list` shows them")
    raise UsageError(f"{len(hits)} jobs start with {text!r}; give more characters")


def _job_exit(job: JobRead) -> int:
    if job.status is JobStatus.failed:
        print(error_line(job), file=sys.stderr)
        return EXIT_JOB_FAILED
    if job.status is JobStatus.cancelled:
        print(error_line(job), file=sys.stderr)
        return EXIT_JOB_CANCELLED
    return EXIT_OK


def _follow(client: DareClient, job: JobRead, bars: _Bars, interval: float) -> JobRead:
    # Progress events only earn a line where there is no live bar to show them.
    def on_event(e: EventRead) -> None:
        if e.kind == "progress" and bars.enabled:
            return
        line = event_line(e)
        if line:
            bars.write(line)

    try:
        return client.wait(job.id, on_update=bars.stage, on_event=on_event, interval=interval)
    finally:
        bars.close()


def _download(client: DareClient, job_id: Any, out: Path, names: Sequence[str], bars: _Bars) -> int:
    paths = client.download_all(job_id, out, names, on_progress=bars.transfer)
    bars.close()
    for p in paths:
        print(f"downloaded {p}")
    if not paths:
        print(f"job {job_id} has no artifacts", file=sys.stderr)
    return EXIT_OK


def _parse_config(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = raw
    if raw.startswith("@"):
        try:
            text = Path(raw[1:]).read_text()
        except OSError as e:
            raise UsageError(f"--config {raw}: cannot read the file ({e.strerror})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--config is not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno}); give a JSON object or @file.json") from None
    if not isinstance(obj, dict):
        raise UsageError("--config must be a JSON object, e.g. '{\"q\": 0.95}'")
    return json.dumps(obj)


def cmd_submit(args: argparse.Namespace) -> int:
    config = _parse_config(args.config)
    for label, p in (("--model", args.model), ("--history", args.history), ("--data", args.data)):
        if p is not None and not p.is_file():
            raise UsageError(f"{label} {p}: no such file")
    bars = _Bars(not args.no_progress)
    last_field = "data" if args.data is not None else "history"

    def on_upload(field: str, done: int, total: int) -> None:
        bars.transfer(field, done, total)
        if field == last_field and done >= total and bars.enabled:
            # The server reads the files before it answers: say why nothing moves meanwhile.
            print("uploaded; the server is checking the files...", file=sys.stderr, flush=True)

    with _client(args) as client:
        job = client.submit(args.model, args.history, data=args.data, dataset=args.dataset,
                            config=config, idempotency_key=args.idempotency_key,
                            on_upload_progress=on_upload)
        bars.close()
        if not args.wait:
            if args.json:
                print(job.model_dump_json(indent=2))
            else:
                print(f"submitted job {job.id} ({job.status.value})")
                print(f"follow it with: dare watch {job.id}")
            return EXIT_OK
        print(f"submitted job {job.id}; following it (Ctrl-C stops following, not the job)",
              flush=True)
        job = _follow(client, job, bars, args.interval)
        code = _job_exit(job)
        if code != EXIT_OK:
            return code
        for line in summary_lines(job.result):
            print(line)
        out = args.out or Path(f"dare-{str(job.id)[:8]}")
        return _download(client, job.id, out, (), bars)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get(_resolve(client, args.job_id))
    if args.json:
        print(job.model_dump_json(indent=2))
    else:
        print(job_line(job))
        times = [f"{k} {v.astimezone().isoformat(timespec='seconds')}"
                 for k, v in (("created", job.created_at), ("started", job.started_at),
                              ("finished", job.finished_at)) if v is not None]
        print("  " + ", ".join(times))
        for i in job.inputs:
            print(f"  input {i.field}: {i.filename} ({i.size} bytes, sha256 {i.sha256[:12]}...)")
        for line in summary_lines(job.result):
            print("  " + line)
    return _job_exit(job)


def cmd_watch(args: argparse.Namespace) -> int:
    bars = _Bars(not args.no_progress)
    with _client(args) as client:
        job = _follow(client, client.get(_resolve(client, args.job_id)), bars, args.interval)
    print(job_line(job))
    code = _job_exit(job)
    if code == EXIT_OK:
        for line in summary_lines(job.result):
            print(line)
    return code


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = list(client.iter_jobs(args.status or (), page_size=min(args.limit, 200),
                                     max_items=args.limit))
    if args.json:
        print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
        return EXIT_OK
    if not jobs:
        print("no jobs" + (f" with status {', '.join(args.status)}" if args.status else ""))
        return EXIT_OK
    print(f"{'ID':<36}  {'STATUS':<10} {'STAGE':<22} {'OVERALL':>7}  CREATED")
    for j in jobs:
        st = j.stage
        where = f"[{(st.index or 0) + 1}/{st.total}] {st.name or '-'} {_pct(st.progress)}"
        created = j.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{j.id}  {j.status.value:<10} {where:<22} {_pct(j.progress):>7}  {created}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(_resolve(client, args.job_id))
    if job.status is JobStatus.cancelled:
        print(f"job {job.id} cancelled")
    else:
        print(f"job {job.id} {job.status.value}: it stops at its next checkpoint "
              f"(see it with: dare watch {job.id})")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    bars = _Bars(not args.no_progress)
    with _client(args) as client:
        job_id = _resolve(client, args.job_id)
        return _download(client, job_id, args.out or Path(f"dare-{job_id[:8]}"), args.names, bars)


# --- wiring ---------------------------------------------------------------------------------

def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the client's errors into one line on stderr and a documented exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as e:
            print(f"dare {args.command}: {e}", file=sys.stderr)
            return EXIT_USAGE
        except ServerUnreachable as e:
            print(f"dare {args.command}: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except DownloadError as e:
            print(f"dare {args.command}: {e}", file=sys.stderr)
            return EXIT_DOWNLOAD
        except ApiError as e:
            hint = ""
            if e.status == 401:
                hint = " (pass --key or set DARE_API_KEY; `dare keys create` makes one)"
            print(f"dare {args.command}: {e.detail} [{e.status} {e.code}]{hint}", file=sys.stderr)
            return EXIT_API_ERROR
        except ClientError as e:
            print(f"dare {args.command}: {e}", file=sys.stderr)
            return EXIT_API_ERROR
        except BrokenPipeError:
            # `dare list | head`: the reader left; stop quietly, as Unix tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_API_ERROR
        except KeyboardInterrupt:
            print(f"\ndare {args.command}: interrupted (a submitted job keeps running)", file=sys.stderr)
            return 130

    return run


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server")
    g.add_argument("--url", default=os.environ.get("DARE_URL") or DEFAULT_URL,
                   help=f"the API's base URL (DARE_URL; default {DEFAULT_URL})")
    g.add_argument("--key", default=os.environ.get("DARE_API_KEY"),
                   help="API key, sent as a Bearer token (DARE_API_KEY)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--no-progress", action="store_true", help="no progress bars")
    follow = argparse.ArgumentParser(add_help=False, parents=[quiet])
    follow.add_argument("--interval", type=float, default=1.0,
                        help="seconds between polls while following a job (default 1)")
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, help: str, fn: Callable[[argparse.Namespace], int],
            parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EXIT_CODES_HELP,
                           formatter_class=fmt, parents=parents)
        p.set_defaults(func=_guard(fn))
        return p

    p = add("submit", "submit a model to a DARE server (upload progress on stderr)", cmd_submit,
            [common, follow])
    p.add_argument("--model", required=True, type=Path, help=".onnx or .pt2 classifier")
    p.add_argument("--history", required=True, type=Path, help=".zip of per-epoch checkpoints")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help=".npz with x_train, y_train, x_val, y_val, x_test, y_test")
    src.add_argument("--dataset", help="an embedded dataset instead: digits, mnist5k or fashion")
    p.add_argument("--config", default=None, help="JSON object, or @file.json")
    p.add_argument("--idempotency-key", default=None,
                   help="resubmitting with the same key returns the same job instead of a new one")
    p.add_argument("--wait", action="store_true",
                   help="follow the job live, then download its artifacts into --out")
    p.add_argument("--out", type=Path, default=None,
                   help="with --wait: where the artifacts go (default ./dare-<job id prefix>)")
    p.add_argument("--json", action="store_true", help="without --wait: print the job as JSON")

    p = add("status", "show one job (exit code reflects a failed or cancelled job)", cmd_status,
            [common])
    p.add_argument("job_id", help="the job's id, or its first characters")
    p.add_argument("--json", action="store_true", help="print the job object as JSON")

    p = add("watch", "follow a job live until it ends", cmd_watch, [common, follow])
    p.add_argument("job_id", help="the job's id, or its first characters")

    p = add("list", "list jobs, newest first", cmd_list, [common])
    p.add_argument("--status", action="extend", nargs="+", default=[],
                   choices=[s.value for s in JobStatus], help="keep only these statuses")
    p.add_argument("--limit", type=_positive_int, default=20, help="show at most N jobs (default 20)")
    p.add_argument("--json", action="store_true", help="print a JSON array of job objects")

    p = add("cancel", "cancel a job (a running one stops at its next checkpoint)", cmd_cancel, [common])
    p.add_argument("job_id", help="the job's id, or its first characters")

    p = add("download", "download a job's artifacts (all, or the NAMEs given)", cmd_download,
            [common, quiet])
    p.add_argument("job_id", help="the job's id, or its first characters")
    p.add_argument("names", nargs="*", metavar="NAME", help="e.g. hardened.onnx report.html")
    p.add_argument("--out", type=Path, default=None, help="directory (default ./dare-<job id prefix>)")



ENTRY_POINT_GROUP = "dare.commands"  # each entry point: a register(subparsers) function


def _plugins() -> list[Callable[[argparse._SubParsersAction], None]]:
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            found.append(ep.load())
        except ImportError as e:  # a half-installed server must not take the client down with it
            print(f"dare: the {ep.name!r} commands are unavailable ({e})", file=sys.stderr)
    return found


def build_parser(extra: Sequence[Callable[[argparse._SubParsersAction], None]] = ()
                 ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dare", description="DARE robustness hardening service",
                                     epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)  # submit, status, watch, list, cancel, download
    seen = set()
    for reg in (*extra, *_plugins()):
        key = (reg.__module__, reg.__qualname__)
        if key not in seen:  # the same plugin given explicitly and found as an entry point
            seen.add(key)
            reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
