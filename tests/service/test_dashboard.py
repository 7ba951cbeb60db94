"""The Grafana dashboard under docker/: every query names a metric that /metrics exposes, and the
compose profile provisions it (Prometheus scraping the API, Grafana loading the file)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from .conftest import REPO, run_all_stages, submit_files

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "dare.json"
METRIC = re.compile(r"\b(dare_[a-z0-9_]+)\b")
# What the issue asks the dashboard to show, each by the metric that carries it.
WANTED = {"jobs by status": "dare_jobs", "queue age": "dare_oldest_queued_job_age_seconds",
          "stage durations": "dare_stage_duration_seconds_bucket",
          "webhook deliveries": "dare_webhook_deliveries_total",
          "upload rejections": "dare_upload_rejections_total"}


def queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def exposed_samples(client: TestClient) -> set[str]:
    r = TestClient(client.app).get("/metrics")
    assert r.status_code == 200
    return {s.name for f in text_string_to_metric_families(r.text) for s in f.samples}


def test_every_dashboard_query_names_an_exposed_metric(client, subject_bytes):
    # one finished job, so that the stage histogram has samples to expose
    files, data = submit_files(subject_bytes)
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    run_all_stages(client, r.json()["id"])
    client.post("/v1/jobs", files={"model": ("m.txt", b"x")})  # one rejection, counted
    exposed = exposed_samples(client)
    named = {m for q in queries() for m in METRIC.findall(q)}
    assert named, "the dashboard has no queries"
    assert named <= exposed, f"queried but not exposed: {sorted(named - exposed)}"
    for what, metric in WANTED.items():
        assert metric in named, f"no panel shows {what} ({metric})"


def test_panels_are_well_formed_and_use_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    ds = yaml.safe_load((REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == uid for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
    for q in queries():  # balanced brackets: a typo Grafana would only show as a red panel
        for a, b in ("()", "{}", "[]"):
            assert q.count(a) == q.count(b), q


def test_compose_monitoring_profile_wires_prometheus_and_grafana():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]
    for name in ("prometheus", "grafana"):
        assert svc[name]["profiles"] == ["monitoring"], name  # optional: not in a plain `up`
    for mount in svc["prometheus"]["volumes"] + svc["grafana"]["volumes"]:
        src = mount.split(":")[0]
        assert (REPO / src).exists(), src
    prom = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["api:8000"] and prom["scrape_configs"][0]["metrics_path"] == "/metrics"
    prov = yaml.safe_load((REPO / "docker/grafana/provisioning/dashboards/dare.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert any(m.endswith(":/var/lib/grafana/dashboards:ro") for m in svc["grafana"]["volumes"])
    assert Path(DASHBOARD).name in {p.name for p in (REPO / "docker/grafana/dashboards").iterdir()}
