"""pages/common/__init__.py: the shared helpers that run an operation and report its error."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def helper_script() -> None:
    import streamlit as st

    import source
    from classroom.runtime import get_runtime
    from classroom.sandboxes.sandbox import new_sandbox_id
    from pages.common import kept_outcome, run_and_keep, run_or_report

    lab = get_runtime().lab(st.session_state.setdefault("sandbox", new_sandbox_id()))
    email = st.text_input("Email")
    user = run_or_report(
        lab, "User not created.", source.create_user, email=email, name="Ada Lovelace"
    )
    if user is not None:
        st.success(f"created {user.email}")
    st.button(
        "Keep",
        on_click=run_and_keep,
        args=(lab, "kept", "Nothing kept.", source.create_user),
        kwargs={"email": "kept@example.com", "name": "Kept User"},
    )
    kept = kept_outcome("kept")
    if kept is not None:
        st.success(f"kept {kept.email}")


def test_run_or_report_returns_the_result_or_shows_the_error(fresh_global_runtime):
    app = AppTest.from_function(helper_script, default_timeout=60)
    app.run()
    assert [e.value for e in app.error] == ["User not created. Email is required."]
    app.text_input[0].input("ada@example.com").run()
    assert not app.error and not app.exception
    assert [s.value for s in app.success] == ["created ada@example.com"]


def test_a_kept_outcome_shows_once_and_its_error_is_reported(fresh_global_runtime):
    app = AppTest.from_function(helper_script, default_timeout=60)
    app.run()
    app.text_input[0].input("ada@example.com").run()
    app.button[0].click().run()
    assert "kept kept@example.com" in [s.value for s in app.success]
    app.run()  # shown once: gone on the next rerun
    assert "kept kept@example.com" not in [s.value for s in app.success]
    app.button[0].click().run()  # the same email again: a duplicate, reported, no traceback
    assert not app.exception
    assert any(e.value.startswith("Nothing kept. ") for e in app.error)


def test_plain_text_escapes_every_character_markdown_could_read():
    import re
    import string

    from pages.common import WORD_JOINER, plain_text

    for text in [
        "www.evil-site.com",
        "_x_@evil.com",
        "[click](http://evil.example)",
        "![x](http://e/x.png)",
        "<b>bold</b>",
        "**Alex**",
        "# Heading",
        "Seán O'Brien-Ní Dhuibhir",
    ]:
        escaped = plain_text(text)
        shown = re.sub(r"\\(.)", r"\1", escaped).replace(WORD_JOINER, "")
        assert shown == text  # unescaped, it is the text as typed (the joiners are invisible)
        # What is left outside the escapes has no punctuation at all.
        bare = re.sub(r"\\.", "", escaped)
        assert not set(bare) & set(string.punctuation), (text, escaped)


def test_plain_text_keeps_what_streamlit_would_link_as_text():
    """Streamlit links anything like an email, `www.` or `scheme://`, escaped or not; a word
    joiner (invisible) before `@`, after `www` and before `://` keeps each one text."""
    from pages.common import WORD_JOINER, plain_text

    escaped = plain_text("alex.smith@example.com www.example.com http://example.com")
    assert f"smith{WORD_JOINER}\\@example" in escaped
    assert f"www{WORD_JOINER}\\.example" in escaped
    assert f"http{WORD_JOINER}\\:\\/\\/" in escaped
