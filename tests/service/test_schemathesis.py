"""Schemathesis against the OpenAPI schema: no request, valid or not, makes the API answer 5xx.

Every operation, with a real bearer key (tenant "fuzz") on PostgreSQL, positive and negative
data, a bounded and derandomised number of examples so runs are reproducible. The broker is
the recording stand-in (nothing is queued anywhere) and submission inspection is off: a fuzzed
upload never passes the cheap checks, and a torch process per case would cost minutes.
Besides "no server error", answers must conform to the documented status codes, content types
and response schemas. The totals are printed at the end (``-s`` shows them).
"""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import DataGenerationMethod

from service.settings import Settings

from .conftest import FAKE_RUNNER, REDIS_URL, RecordingDispatcher, make_key

MAX_EXAMPLES = 25
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance)
_tally: Counter = Counter()
# FastAPI writes OpenAPI 3.1 (null as a type); schemathesis 3.39 reads it behind this flag.
schemathesis.experimental.OPEN_API_3_1.enable()


def _hypothesis_many_compat() -> None:
    """hypothesis-jsonschema 0.23.1 (schemathesis' object generator) drives Hypothesis'
    internal ``many`` with ``while elements.more(): ...``; the installed Hypothesis (6.170)
    replaced that with ``with many(...) as e: for _ in e:``. Give ``many`` the old method in
    terms of the new protocol (enter on the first call, one step per call, exit at the end)."""
    from hypothesis.internal.conjecture import utils as cu

    if hasattr(cu.many, "more"):
        return

    def more(self) -> bool:  # noqa: ANN001
        it = self.__dict__.get("_compat_iter")
        if it is None:
            self.__enter__()
            it = self._compat_iter = iter(self)
        try:
            next(it)
            return True
        except StopIteration:
            self.__exit__(None, None, None)
            return False

    cu.many.more = more


_hypothesis_many_compat()


@pytest.fixture(scope="module")
def fuzz_app(pg_url, tmp_path_factory):
    from service.api.app import create_app

    home = tmp_path_factory.mktemp("fuzz")
    s = Settings(home=home, database_url=pg_url, broker_url=REDIS_URL, stage_runner=FAKE_RUNNER,
                 max_upload_bytes=256 * 1024, submit_inspection="off")
    app = create_app(s, dispatcher=RecordingDispatcher())
    app.state.fuzz_key = make_key(app.state.ctx.factory, "fuzz")
    yield app
    app.state.ctx.engine.dispose()
    ops = [k for k in _tally if k.startswith("op ")]
    statuses = sorted((k[7:], v) for k, v in _tally.items() if k.startswith("status "))
    print(f"\nschemathesis: {_tally['cases']} cases over {len(ops)} operations, "
          f"{_tally['server_errors']} server errors; statuses {dict(statuses)}")


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.from_asgi(
        "/openapi.json", fuzz_app,
        data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative])


schema = schemathesis.from_pytest_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_app):
    headers = {"Authorization": f"Bearer {fuzz_app.state.fuzz_key}"}
    response = case.call_asgi(headers=headers)
    _tally["cases"] += 1
    _tally[f"op {case.operation.verbose_name}"] += 1
    _tally["server_errors"] += response.status_code >= 500
    _tally[f"status {response.status_code}"] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)
