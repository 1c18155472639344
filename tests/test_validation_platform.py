"""Validation at the platform's edges: sandbox ids, schema names and the URL's sandbox id.

Moved from tests/unit/test_validation.py: these need the classroom (a registry, a runtime).
"""

import pytest

import source
from classroom.browser import SANDBOX_URL_PARAMETER, lab_for_browser_session
from classroom.sandboxes.sandbox import SANDBOX_ID_PATTERN, quoted_schema


@pytest.mark.parametrize(
    "value",
    ["abcdefgh\n", "ABCDEFGH", "abcdefg", "abcdefgh/..", " abcdefgh", "a" * 33, "abcdefgh\x00"],
)
async def test_only_the_issued_sandbox_id_form_is_accepted(registry, value):
    with pytest.raises(source.ValidationError, match="sandbox id"):
        await registry.acquire(value)
    assert len(registry) == 0


def test_schema_names_are_checked_before_they_reach_ddl():
    assert quoted_schema("qulab_abcdefgh") == '"qulab_abcdefgh"'
    for bad in ["qulab_abcdefgh\n", 'qulab_x"; DROP SCHEMA public; --', "public"]:
        with pytest.raises(source.ValidationError):
            quoted_schema(bad)


def test_a_browser_session_ignores_a_url_id_with_a_trailing_newline(fresh_global_runtime):
    state, url = {}, {SANDBOX_URL_PARAMETER: "abcdefgh\n"}
    lab = lab_for_browser_session(state, url)
    assert lab.sandbox_id != "abcdefgh\n" and SANDBOX_ID_PATTERN.fullmatch(lab.sandbox_id)
    assert url[SANDBOX_URL_PARAMETER] == lab.sandbox_id
