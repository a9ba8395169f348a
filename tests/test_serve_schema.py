"""Schemathesis against the server's own OpenAPI schema: no 5xx and no response that breaks the schema.

Bounded: a few examples per operation, so it fits the default suite. The tiny model keeps every generation
short (context 256 tokens caps ``max_tokens``).
"""

from __future__ import annotations

import _infer_helpers as H
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from llmlab.infer import LLM
from llmlab.serve.openai_api import ServedModel
from llmlab.serve.server import BackgroundServer

one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)


@pytest.fixture(scope="module")
def served():
    llm = LLM.from_model(H.model(max_seq_len=256), H.tokenizer(), enable_prefix_caching=True)
    with BackgroundServer([ServedModel("tiny", llm, root="tiny")]) as url:
        yield url


def test_api_conforms_to_its_schema(served):
    schema = schemathesis.openapi.from_url(served + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/tokenize"}
    for operation in operations:
        has_body = operation.method.upper() == "POST"  # GETs take no input: nothing to get wrong
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if has_body else 1]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
            )
            def check(case):
                # Schema-valid is not always acceptable: a prompt longer than the context, a JSON schema the
                # grammar compiler rejects or tool-call arguments that are not JSON are 400s by design.
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            check()
