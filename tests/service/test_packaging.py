"""The two distributions as a user gets them: ``python -m build`` makes a wheel and an sdist of
each; the client installs alone into a fresh virtualenv (no torch, celery or sqlalchemy) and drives
a real job against a running ``dare serve``; the service's wheel, installed into a fresh
virtualenv, runs ``dare --help`` and ``dare db upgrade`` on SQLite.

The service wheel's fresh virtualenv borrows its third-party dependencies (torch alone is
gigabytes) from the environment running the tests through a ``.pth`` line; the wheels themselves,
and so our code, the migrations and the entry points, come only from the build.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, Proc, free_port, service_env, wait_http

pytestmark = pytest.mark.slow

def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{argv}\nrc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # A copy of the checkout's files (tracked, or new and not ignored): setuptools writes build/
    # and *.egg-info beside the sources, which must not land in the checkout.
    src = tmp_path_factory.mktemp("src")
    listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    # --no-isolation: the build backend (setuptools) of the test environment, no download.
    for tree in (src / "clients" / "python", src):
        _run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist",
              "--outdir", str(out), str(tree)], cwd=tree)
    found = {p.name: p for p in out.iterdir()}
    pick = {kind: next(p for n, p in found.items() if n.startswith(prefix) and n.endswith(ext))
            for kind, prefix, ext in (("client_whl", "dare_client-", ".whl"),
                                      ("client_sdist", "dare_client-", ".tar.gz"),
                                      ("service_whl", "dare_service-", ".whl"),
                                      ("service_sdist", "dare_service-", ".tar.gz"))}
    return pick


def _fresh_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin" / "python"


def _site(python: Path) -> Path:
    return Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())


def test_the_wheels_hold_the_code_and_the_migrations_but_not_bench(dists):
    with zipfile.ZipFile(dists["service_whl"]) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    tops = {n.split("/")[0] for n in names if not n.startswith("dare_service-")}
    assert tops == {"service", "worker"}, tops
    assert "service/store/migrations/env.py" in names
    assert "service/store/migrations/script.py.mako" in names
    assert {f"service/store/migrations/versions/{v}" for v in
            ("0001_initial.py", "0002_tenants.py", "0003_webhooks.py")} <= set(names)
    assert "[dare.commands]" in entry_points and "[console_scripts]" not in entry_points
    with zipfile.ZipFile(dists["client_whl"]) as z:
        names = z.namelist()
        meta = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {n.split("/")[0] for n in names if not n.startswith("dare_client-")} == {"dare_client"}
    requires = sorted(line.split(":", 1)[1].split(">")[0].strip()
                      for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["httpx", "pydantic", "tqdm"]


def test_the_service_wheel_installs_and_migrates(dists, tmp_path: Path):
    py = _fresh_venv(tmp_path / "venv")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          str(dists["client_whl"]), str(dists["service_whl"])])
    # Third-party dependencies from the test environment: appended after the venv's own
    # site-packages, so our packages resolve to the installed wheels, never to the checkout.
    (_site(py) / "zz_borrowed_deps.pth").write_text(site.getsitepackages()[0] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "PYTHON"))}
    env["DARE_HOME"] = str(tmp_path / "home")
    dare = str(tmp_path / "venv" / "bin" / "dare")
    where = _run([str(py), "-c", "import service, worker, dare_client; "
                  "print(service.__file__, worker.__file__, dare_client.__file__)"],
                 cwd=tmp_path, env=env).stdout
    assert all(p.startswith(str(tmp_path / "venv")) for p in where.split()), where

    help_text = _run([dare, "--help"], cwd=tmp_path, env=env).stdout
    for cmd in ("submit", "watch", "serve", "api", "worker", "db", "keys", "harden"):
        assert f"\n    {cmd} " in help_text, help_text
    out = _run([dare, "db", "upgrade"], cwd=tmp_path, env=env)
    current = _run([dare, "db", "current"], cwd=tmp_path, env=env).stdout
    assert "0003" in current, out.stdout + out.stderr + current
    assert (tmp_path / "home").exists()


def test_the_client_alone_drives_a_real_job(dists, tmp_path: Path):
    t0 = time.monotonic()
    py = _fresh_venv(tmp_path / "client-venv")
    _run([str(py), "-m", "pip", "install", "-q", str(dists["client_whl"])])
    install_s = time.monotonic() - t0
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None "
             "for m in ('torch', 'celery', 'sqlalchemy', 'fastapi', 'service', 'worker', "
             "'dare_client', 'httpx', 'pydantic', 'tqdm')}))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "PYTHON"))}
    present = json.loads(_run([str(py), "-c", probe], cwd=tmp_path, env=clean).stdout)
    assert present == {"torch": False, "celery": False, "sqlalchemy": False, "fastapi": False,
                       "service": False, "worker": False, "dare_client": True, "httpx": True,
                       "pydantic": True, "tqdm": True}, present
    help_text = _run([str(tmp_path / "client-venv" / "bin" / "dare"), "--help"], cwd=tmp_path,
                     env=clean).stdout
    assert "submit" in help_text and "\n    serve " not in help_text, help_text

    subject = tmp_path / "subject"  # the README's first session: a small LeNet on digits
    _run([sys.executable, "-c", "from service.cli.main import main; raise SystemExit(main())",
          "train-reference", "--arch", "lenet", "--dataset", "digits", "--epochs", "3",
          "--out", str(subject)], env=service_env(), cwd=tmp_path, timeout=300)
    port = free_port()
    server = Proc("serve", [sys.executable, "-c",
                            "from service.cli.main import main; raise SystemExit(main())",
                            "serve", "--port", str(port), "--home", str(tmp_path / "home"),
                            "--worker-loglevel", "WARNING"], service_env(), tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", server, timeout=120)
        config = {"evaluation": {"n_samples": 60, "attacks": ["fgsm", "pgd"]}}
        r = subprocess.run([str(tmp_path / "client-venv" / "bin" / "dare"), "submit",
                            "--model", str(subject / "model.onnx"),
                            "--history", str(subject / "history.zip"), "--dataset", "digits",
                            "--config", json.dumps(config), "--wait", "--out", "got"],
                           cwd=tmp_path, env={**clean, "DARE_URL": f"http://127.0.0.1:{port}"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{server.tail()}"
        assert "succeeded" in r.stdout
        report = json.loads((tmp_path / "got" / "report.json").read_text())
        assert report["config"]["evaluation"]["n_samples"] == 60
        assert (tmp_path / "got" / "hardened.onnx").stat().st_size > 0
    finally:
        server.stop()
    print(f"client-only install: {install_s:.1f} s")
