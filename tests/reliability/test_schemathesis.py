"""Property-based requests generated from our own OpenAPI schema: no request gets a 5xx.

Schemathesis's pytest plugin does not support pytest 9 yet, so the operations are
driven through its Python API with Hypothesis directly.
"""

from __future__ import annotations

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 30


def test_no_generated_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.rest_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    codes: Counter[int] = Counter()
    failures: list[str] = []

    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def exercise(case) -> None:
            response = case.call(base_url=server.rest_url, timeout=10)
            codes[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
                )

        exercise()

    total = sum(codes.values())
    summary = dict(sorted(codes.items()))
    print(f"\nschemathesis: {len(operations)} operations, {total} generated requests, codes {summary}")
    assert failures == []
    assert total >= len(operations) * 5
    assert httpx.get(f"{server.rest_url}/v2/health/ready", timeout=5).status_code == 200
