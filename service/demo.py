"""The demo client behind ``make demo``: start ``dare serve``, submit a subject over REST, show
its progress, download the artifacts, say where the report is, stop the server.

    python -m service.demo --subject demo-out/subject --out demo-out [--port 8000]

It only uses the public HTTP API (httpx), as any client would.
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

import httpx

# DESIGN.md's defaults (all five attacks, 500 samples): on the digits subject they take well
# under a minute on a laptop CPU.
DEMO_CONFIG: dict = {}
TERMINAL = {"succeeded", "failed", "cancelled"}


def start_server(port: int, home: Path, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", "from service.cli import main; raise SystemExit(main())",
           "serve", "--port", str(port), "--home", str(home)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_ready(base: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"dare serve exited ({server.returncode}); see {log}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"dare serve did not become ready in {timeout:.0f} s; see {log}")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(40)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def submit(base: str, subject: Path, config: dict) -> dict:
    model = subject / "model.onnx"
    with model.open("rb") as m, (subject / "history.zip").open("rb") as h:
        r = httpx.post(f"{base}/v1/jobs", timeout=120,
                       files={"model": (model.name, m), "history": ("history.zip", h)},
                       data={"dataset": "digits", "config": json.dumps(config)})
    if r.status_code != 202:
        raise SystemExit(f"submission refused ({r.status_code}): {r.text}")
    return r.json()


def follow(base: str, job: dict) -> dict:
    """Print one line per change of stage or percent until the job ends."""
    url = f"{base}{job['urls']['self']}"
    last, t0 = None, time.monotonic()
    while True:
        job = httpx.get(url, timeout=30).json()
        st = job["stage"]
        line = (f"  [{(st['index'] or 0) + 1}/{st['total']}] {st['name'] or '-':<9} "
                f"{100 * st['progress']:5.1f}%   overall {100 * job['progress']:5.1f}%   "
                f"{job['status']:<10} {time.monotonic() - t0:6.1f} s")
        key = (job["status"], st["name"], round(st["progress"], 2))
        if key != last:
            print(line, flush=True)
            last = key
        if job["status"] in TERMINAL:
            return job
        time.sleep(1.0)


def download(base: str, job: dict, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for a in httpx.get(f"{base}{job['urls']['artifacts']}", timeout=30).json():
        p = dest / a["name"]
        with httpx.stream("GET", f"{base}{a['url']}", timeout=120) as r, p.open("wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
        paths.append(p)
    return paths


def summarize(job: dict) -> None:
    res = job["result"] or {}
    ca = res.get("clean_accuracy") or {}
    if ca:
        print(f"\nclean accuracy: {ca.get('original', 0):.3f} -> {ca.get('hardened', 0):.3f} "
              f"(within the {ca.get('budget', 0):.0%} budget: {ca.get('within_budget')})")
    if res.get("attacks"):
        print(f"{'attack':<8}{'original':>10}{'transfer ER':>13}{'adaptive':>10}")
        for name, a in res["attacks"].items():
            print(f"{name:<8}{a.get('original_accuracy', 0):>10.3f}{a.get('transfer_er', 0):>13.3f}"
                  f"{a.get('adaptive_accuracy', 0):>10.3f}")
    if res.get("stage_durations_s"):
        print("stage times (s): " + ", ".join(f"{k} {v:.1f}"
                                              for k, v in res["stage_durations_s"].items()))


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
        wait_ready(base, server, log)
        job = submit(base, args.subject, config)
        print(f"submitted job {job['id']} ({base}{job['urls']['self']})", flush=True)
        job = follow(base, job)
        if job["status"] != "succeeded":
            print(f"job {job['status']}: {json.dumps(job['error'])}", file=sys.stderr)
            return 1
        files = download(base, job, args.out / "artifacts")
    finally:
        stop_server(server)
    summarize(job)
    print(f"\nartifacts: {', '.join(p.name for p in files)} in {args.out / 'artifacts'}")
    for name in ("report.json", "report.html"):
        print(f"{name}: {(args.out / 'artifacts' / name).resolve()}")
    print(f"demo wall time: {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
