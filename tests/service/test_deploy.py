"""docker-compose.yml, the Dockerfiles, the Makefile and .ci/run run the same commands as the
tests (no Docker engine here, so this keeps them from drifting apart)."""
from __future__ import annotations

import os
import re

import yaml

from service.cli.main import build_parser, worker_argv

from .conftest import REPO


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _dockerfile_cmd(name: str) -> list[str]:
    text = (REPO / "docker" / name).read_text().replace("\\\n", " ")
    m = re.search(r"^CMD (\[.*\])\s*$", text, re.M)
    assert m, f"no CMD in {name}"
    return yaml.safe_load(m.group(1))


def test_compose_has_the_five_services_and_a_gpu_worker():
    svc = _compose()["services"]
    default = {k for k, v in svc.items() if not v.get("profiles")}  # what a plain `up` starts
    assert default == {"api", "worker", "postgres", "redis", "migrate"}
    assert {k for k in svc if k not in default} == {"prometheus", "grafana"}  # --profile monitoring
    assert svc["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert svc["api"]["build"]["dockerfile"] == "docker/api.Dockerfile"
    devices = svc["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert svc["migrate"]["restart"] == "no"
    for name in ("api", "worker", "migrate"):
        env = svc[name]["environment"]
        assert env["DARE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["DARE_BROKER_URL"].startswith("redis://")
    # the API and the workers share the artifact store
    assert svc["api"]["volumes"] == svc["worker"]["volumes"]


def test_compose_and_dockerfiles_run_the_commands_the_tests_run():
    svc = _compose()["services"]
    celery = worker_argv()[2:]  # drop "python -m"
    assert svc["worker"]["command"] == celery
    assert _dockerfile_cmd("worker.Dockerfile") == celery
    assert celery[celery.index("-Q") + 1] == "gpu" and celery[celery.index("-c") + 1] == "1"
    assert svc["migrate"]["command"] == ["dare", "db", "upgrade"]
    assert svc["api"]["command"][:2] == ["dare", "api"] == _dockerfile_cmd("api.Dockerfile")[:2]
    # and the dare CLI accepts them
    parser = build_parser()
    parser.parse_args(svc["api"]["command"][1:])
    parser.parse_args(svc["migrate"]["command"][1:])
    for f in ("api.Dockerfile", "worker.Dockerfile"):
        text = (REPO / "docker" / f).read_text()
        assert re.search(r'pip install -e "?\.', text) and "COPY alembic ./alembic" in text
    # the worker logs finished jobs to MLflow when DARE_MLFLOW_TRACKING_URI is set: its image
    # has the extra unless built with --build-arg EXTRAS=
    worker = (REPO / "docker" / "worker.Dockerfile").read_text()
    assert "ARG EXTRAS=mlflow" in worker and '".${EXTRAS:+[$EXTRAS]}"' in worker


def test_worker_dockerfile_uses_a_cuda_base_image():
    text = (REPO / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", text, re.M)


def test_ci_runs_make_test_and_make_test_fails_on_no_tests():
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "\nmake test\n" in text
    mk = (REPO / "Makefile").read_text()
    assert re.search(r"^test:", mk, re.M) and "-eq 5" in mk
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
