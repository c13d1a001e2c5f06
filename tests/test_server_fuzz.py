"""Schema fuzzing (issues 9, 12): schemathesis draws requests from the OpenAPI schema, valid and invalid, and
runs every check (`st run --checks all`): no 5xx, answers match the schema, valid requests are accepted and
invalid ones rejected. Driven through Hypothesis directly (not schemathesis' pytest plugin, which reaches
into pytest internals that pytest 9.2 removed). Bounded for CI."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from tiny import tiny_engine

from engine.config import MAX_NEW_TOKENS_CAP
from engine.host import EngineHost
from engine.server import create_app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

MAX_TOKENS = 6  # generation length per fuzzed request: the schema allows 4096, the test budget does not
CAPS = {"max_new_tokens": MAX_TOKENS, "max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "n": 2}
EXAMPLES = 15  # per operation and mode; `seed` makes them the same on every run


@pytest.fixture(scope="module")
def api_schema():
    host = EngineHost()
    host.adopt(tiny_engine())
    config = schemathesis.Config.from_path(ROOT / "schemathesis.toml")  # what `st run` reads too
    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(host), config=config)
    yield loaded
    host.shutdown()


def _cap(body, mode: GenerationMode) -> None:
    """Shorten a request so it generates a handful of tokens, without making an invalid request valid."""
    if not isinstance(body, dict):
        return
    for key, cap in CAPS.items():
        value = body.get(key)
        if value is None and mode is GenerationMode.POSITIVE:  # absent or null: the default (128) is too long
            body[key] = cap  # routes ignore keys they do not know
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and cap < value <= (MAX_NEW_TOKENS_CAP if key != "n" else 8)):
            body[key] = cap  # only values the schema allows: an out-of-range value is a negative test
    for key in ("prompts", "prompt"):  # a negative case keeps its list: the bad item may be any one of them
        if mode is GenerationMode.POSITIVE and isinstance(body.get(key), list):
            body[key] = body[key][:3]


def _fuzz(operation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        _cap(case.body, mode)
        case.validate_response(case.call())  # every check schemathesis has, as `st run --checks all`

    run()


def test_fuzzed_requests_never_500_and_match_the_schema(api_schema):
    tested, failures = {GenerationMode.POSITIVE: [], GenerationMode.NEGATIVE: []}, []
    for result in api_schema.get_all_operations():
        operation = result.ok()  # an invalid schema raises here, naming the operation
        for mode in tested:
            try:
                _fuzz(operation, mode)
            except Unsatisfiable:  # GET /ping and the like take no input: nothing to make invalid
                if mode is GenerationMode.POSITIVE:
                    raise
                continue
            except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
                failures.append(f"{operation.label} ({mode.value}): {exc}")
            tested[mode].append(operation.label)
    assert len(tested[GenerationMode.POSITIVE]) >= 9, f"not every route was fuzzed: {tested}"
    assert sum(label.startswith("POST") for label in tested[GenerationMode.NEGATIVE]) >= 5, tested
    assert not failures, "\n\n".join(failures)
