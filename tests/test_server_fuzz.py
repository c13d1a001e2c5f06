"""Schema fuzzing (issue 9): schemathesis draws requests from the OpenAPI schema, valid and invalid,
and every answer must be a non-5xx that conforms to the documented schema. Bounded for CI."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from tiny import tiny_engine

from engine.host import EngineHost
from engine.server import create_app

MAX_TOKENS = 6  # generation length per fuzzed request: the schema allows 4096, the test budget does not
CAPS = {"max_new_tokens": MAX_TOKENS, "max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "n": 2}


@pytest.fixture(scope="module")
def api_schema():
    host = EngineHost()
    host.adopt(tiny_engine())
    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(host))
    loaded.config.phases.coverage.enabled = False  # its exhaustive boundary cases take minutes here
    loaded.config.seed = 5  # the same examples on every run (bump it locally to explore further)
    yield loaded
    host.shutdown()


schema = schemathesis.pytest.from_fixture("api_schema")


def _cap(body) -> None:
    """Shorten every request so it generates a handful of tokens (absent lengths would default to 128)."""
    if not isinstance(body, dict):
        return
    for key, cap in CAPS.items():
        value = body.get(key)
        if value is None:  # absent or null: the route's default (up to 128) would be too long here
            body[key] = cap  # routes ignore the keys they do not know
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            body[key] = cap  # 2180.0 counts as an int; other bad values stay: they are the negative tests
    for key in ("prompts", "prompt"):
        if isinstance(body.get(key), list):
            body[key] = body[key][:3]


@schema.parametrize()
@settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_500_and_match_the_schema(case):
    _cap(case.body)
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                             content_type_conformance])

