"""The demo client behind ``make demo``: start ``dare serve``, submit a subject over REST, show
its progress, download the artifacts, say where the report is, stop the server.

    python -m service.cli.demo --subject demo-out/subject --out demo-out [--port 8000]

It only uses the public HTTP API, through ``dare_client.client`` (the typed client ``dare submit``
uses too).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dare_client.cli import summary_lines
from dare_client.client import ClientError, DareClient, wait_ready
from dare_client.schemas import JobRead

# DESIGN.md's defaults (every attack, 500 samples), except AutoAttack's fast version (APGD-CE +
# APGD-T): the standard one costs about 100 PGD-40 runs on a CPU (bench/results/autoattack_cost.md)
# and would turn a half-minute demo into several minutes.
DEMO_CONFIG: dict = {"evaluation": {"autoattack": {"version": "fast"}}}


def start_server(port: int, home: Path, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", "from service.cli.main import main; raise SystemExit(main())",
           "serve", "--port", str(port), "--home", str(home)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(40)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def follow(client: DareClient, job: JobRead) -> JobRead:
    """Print one line per change of stage or percent until the job ends."""
    last, t0 = None, time.monotonic()

    def show(job: JobRead) -> None:
        nonlocal last
        st = job.stage
        key = (job.status, st.name, round(st.progress, 2))
        if key != last:
            print(f"  [{(st.index or 0) + 1}/{st.total}] {st.name or '-':<9} "
                  f"{100 * st.progress:5.1f}%   overall {100 * job.progress:5.1f}%   "
                  f"{job.status.value:<10} {time.monotonic() - t0:6.1f} s", flush=True)
            last = key

    return client.wait(job.id, on_update=show, interval=1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subject", type=Path, default=Path("demo-out/subject"),
                    help="a dare train-reference output directory")
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--config", default=None, help="JSON config (default: %s)" % json.dumps(DEMO_CONFIG))
    args = ap.parse_args(argv)

    base = f"http://127.0.0.1:{args.port}"
    config = json.loads(args.config) if args.config else DEMO_CONFIG
    log = args.out / "serve.log"
    t0 = time.monotonic()
    print(f"starting dare serve on {base} (log: {log})", flush=True)
    server = start_server(args.port, args.out / "var", log)
    try:
        wait_ready(base, [server], what=f"dare serve (log: {log})")
        with DareClient(base, timeout=120) as client:
            job = client.submit(args.subject / "model.onnx", args.subject / "history.zip",
                                dataset="digits", config=config)
            print(f"submitted job {job.id} ({base}{job.urls['self']})", flush=True)
            job = follow(client, job)
            if job.status.value != "succeeded":
                err = job.error.model_dump() if job.error else None
                print(f"job {job.status.value}: {json.dumps(err)}", file=sys.stderr)
                return 1
            files = client.download_all(job.id, args.out / "artifacts")
    except ClientError as e:
        raise SystemExit(f"demo: {e}") from None
    finally:
        stop_server(server)
    print()
    for line in summary_lines(job.result):
        print(line)
    print(f"\nartifacts: {', '.join(p.name for p in files)} in {args.out / 'artifacts'}")
    for name in ("report.json", "report.html"):
        print(f"{name}: {(args.out / 'artifacts' / name).resolve()}")
    print(f"demo wall time: {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
