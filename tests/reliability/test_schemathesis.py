"""Requests generated from our own OpenAPI document; every answer must conform to it.

Schemathesis generates path parameters, headers and bodies from the schema (the request
bodies of predict, infer, feedback and the alert webhook come from the pydantic models in
``serving/rest/schemas.py`` and ``control/schemas.py``) and sends the documented
examples too. Each answer is checked, not only for "no 5xx": its status must be one the
operation documents, its content type one documented for that status, and its body must
validate against that status's schema. The whole run is made twice: without the admin
token (admin routes must answer their documented 401) and with it.

Schemathesis's pytest plugin does not support pytest 9 yet, so the operations are driven
through its Python API with Hypothesis directly.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.serverproc import ServerProcess, start_server

# Tens of seconds or more: `make test-fast` leaves it out.
pytestmark = pytest.mark.slow

TOKEN = "schema-token-0123456789"
GENERATED_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CUDA_SHM = "/v2/cudasharedmemory"
UNAVAILABLE_BY_DESIGN_CHECKS = [c for c in CHECKS if c is not not_a_server_error]
# Path parameters that address the served model, so that generated bodies reach its decoder
# and the examples get real answers. Admin routes keep generated names: unloading digits
# would take it away from every other operation.
SERVED = {
    "model": "digits",
    "name": "digits",
    "model_method": "digits:predict",
    "version": "1",
    "version_method": "1:predict",
}


@pytest.fixture(scope="module")
def schema_server(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("schema") / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    # The alert webhook's example fires a retrain alert: record it instead of training.
    env = {"MODELLOOP_ADMIN_TOKEN": TOKEN, "MODELLOOP_MONITORING_TRIGGER": "none"}
    proc = start_server(repo, "--state-dir", str(repo.parent / "state"), env=env)
    try:
        yield proc
    finally:
        proc.stop()


def _is_admin(operation: schemathesis.APIOperation) -> bool:
    return bool(operation.definition.raw.get("security"))


@pytest.mark.parametrize("token", [False, True], ids=["without-admin-token", "with-admin-token"])
def test_every_answer_conforms_to_the_documented_schema(schema_server: ServerProcess, token: bool) -> None:
    url = schema_server.rest_url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    outcomes: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    for operation in operations:
        pins = {} if _is_admin(operation) else {k: v for k, v in SERVED.items() if k in operation.path}
        strategies = [
            operation.as_strategy(headers=headers),
            operation.as_strategy(headers=headers, path_parameters=pins),
            *schema.get_strategies_from_examples(operation, headers=headers, path_parameters=pins),
        ]

        @settings(
            max_examples=GENERATED_PER_OPERATION * 2,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=st.one_of(strategies))
        def exercise(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, headers=headers, timeout=30)
            outcomes[(case.operation.label, response.status_code)] += 1
            # CUDA shared memory answers 503 (documented) on every machine: UNAVAILABLE is its answer.
            checks = UNAVAILABLE_BY_DESIGN_CHECKS if case.operation.path.startswith(CUDA_SHM) else CHECKS
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except FailureGroup as failure:  # every check that failed, explained
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {failure}")

        exercise()

    total = sum(outcomes.values())
    codes = Counter(code for (_, code) in outcomes.elements())
    which = "with" if token else "without"
    print(f"\nschemathesis ({which} token): {len(operations)} operations, {total} requests")
    print(f"status codes {dict(sorted(codes.items()))}")
    assert failures == [], "\n\n".join(failures[:5])
    assert total >= len(operations) * GENERATED_PER_OPERATION
    # The examples reached the model: predictions, inference and the status pages answered 200.
    answered = {label for (label, code) in outcomes if code == 200}
    for label in (
        "POST /v1/models/{model_method}",
        "POST /v1/models/{model}/versions/{version_method}",
        "POST /v2/models/{model}/infer",
        "POST /v2/models/{model}/versions/{version}/infer",
        "GET /v2/models/{model}",
    ):
        assert label in answered, label
    admin = {"POST /v2/repository/index", "POST /monitoring/alerts"}
    if token:
        assert admin <= answered
    else:
        assert not admin & answered
        assert all(code == 401 for (label, code) in outcomes if label in admin)
    # Nothing the run did took the model away.
    assert httpx.get(f"{url}/v2/models/digits/ready", timeout=5).status_code == 200
