"""Property-based fuzzing of the API against its own OpenAPI spec (schemathesis): no 5xx.

Schemathesis generates requests for every operation from /openapi.json, both fitting the
schema (positive) and breaking it (negative), and sends them over real HTTP to the API
process of the `served` fixture (real worker, broker and Redis behind it). Besides "never a
server error", answers must use documented status codes and match their documented schema.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

EXAMPLES = 40  # per operation and mode; about 1,000 requests in all


@pytest.fixture
def restored(served):  # noqa: ANN001, ANN201
    """The fuzzer writes rules and experiments with the admin key: leave none behind."""
    yield served
    assert served.put("/v1/rules", {}).status_code == 200
    served.clear_experiments()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_documented_answers(restored, mode):
    served = restored
    schema = schemathesis.openapi.from_url(served.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    fuzzed = 0
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers={"X-API-Key": served.admin},
                checks=[not_a_server_error, status_code_conformance,
                        response_schema_conformance])

        try:
            check()
            fuzzed += 1
        except Unsatisfiable:
            # An operation without parameters or body has no invalid request to generate.
            assert mode == GenerationMode.NEGATIVE, op.label
    assert fuzzed >= 7, fuzzed  # every operation that takes input was fuzzed
