"""The instructor's page and what learners' pages show of the instructor, through AppTest.

Learners are browser sessions (start_app) or Labs driving real steps; their progress reaches the
roster when it is read, as the sidebar reads it on every page. Each test runs in a class of its
own (QULAB_CLASS), so a suite running beside it on the same PostgreSQL never mixes in.
"""

from __future__ import annotations

import secrets

import pytest
from pagetools import APP, button, charts, click, start_app, text_input, texts
from streamlit.proto.TextInput_pb2 import TextInput
from streamlit.testing.v1 import AppTest

import source
from classroom.browser import SANDBOX_STATE_KEY
from classroom.instructor.access import EVERY_SESSION
from classroom.instructor.overview import class_overview
from classroom.progress.steps import STEPS, learner_progress
from classroom.runtime import get_runtime, shutdown_runtime
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import new_sandbox_id
from pages.common import plain_text
from pages.common.class_view import LIVE_KEY, STOP_AFTER_UNCHANGED
from pages.common.instructor import SEES_KEY

KEY = "correct horse battery staple"
INSTRUCTOR_PAGE = "pages/instructor.py"


@pytest.fixture
def own_class(monkeypatch, fresh_global_runtime):
    """A runtime of the test's own, in a class of its own; its tables go afterwards."""
    monkeypatch.setenv("QULAB_CLASS", f"t{secrets.token_hex(4)}")
    monkeypatch.delenv("QULAB_INSTRUCTOR_KEY", raising=False)
    yield
    runtime = get_runtime()

    async def drop() -> None:
        store = runtime.instructor.store
        await runtime.instructor.roster.flush()
        if store.shared:
            async with store.engine.begin() as connection:
                await connection.run_sync(store.tables.metadata.drop_all)

    runtime.run(drop())
    shutdown_runtime()


@pytest.fixture
def keyed(own_class, monkeypatch):
    monkeypatch.setenv("QULAB_INSTRUCTOR_KEY", KEY)
    EVERY_SESSION.clear()  # this process's tries: every page test runs in this one


def instructor_page() -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.switch_page(INSTRUCTOR_PAGE)  # /instructor, as the instructor opens it
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def enter_key(app: AppTest, typed: str) -> AppTest:
    field = text_input(app, "Instructor key")
    assert field.proto.type == TextInput.PASSWORD
    field.input(typed)
    return click(app, "Enter")


def learners_with_steps() -> dict[str, set[str]]:
    """Three learners at different steps (real operations, journaled as a page runs them);
    their progress read as the sidebar reads it. Returns each one's checked steps."""
    runtime = get_runtime()
    checked = {}
    for actions in ((), ("create_user",), ("create_user", "initialize")):
        lab = runtime.lab(new_sandbox_id())
        if "create_user" in actions:
            lab.run(source.create_user, email=f"{lab.sandbox_id}@example.com", name="Someone")
        if "initialize" in actions:
            lab.run(initialize_sandbox)
        progress = lab.run(learner_progress)
        checked[lab.sandbox_id] = {status.step.key for status in progress.steps if status.done}
    return checked


def funnel_shown(app: AppTest) -> dict[str, int]:
    """The funnel table's counts, by step title (section number left off)."""
    [table] = [t.value for t in app.table if "learners who completed it" in t.value.columns]
    return {
        step.removesuffix(" (optional)"): int(count)
        for step, count in zip(table["step"], table["learners who completed it"], strict=True)
    }


def test_without_a_key_the_page_says_how_to_set_one_and_shows_nothing_of_the_class(own_class):
    learners_with_steps()
    app = instructor_page()

    shown = "\n".join([texts(app), *(code.value for code in app.code)])
    assert "QULAB_INSTRUCTOR_KEY" in shown and "instructor_key" in shown
    assert "secrets.toml" in shown
    assert not app.text_input and not app.metric and not app.table and not charts(app)
    assert "Create a user" not in shown and "Learner" not in shown

    runtime = get_runtime()  # a message left in the store (a key set before, say) ...
    runtime.run(runtime.instructor.board.post("Left from an earlier class"))
    learner = start_app()  # ... and still a learner's page draws nothing of an instructor
    assert "What your instructor sees" not in [e.label for e in learner.sidebar.expander]
    assert not [b for b in learner.button if b.label == "Dismiss"]
    assert "Left from an earlier class" not in texts(learner)


def test_a_wrong_key_is_refused_and_the_sixth_try_in_a_minute_waits(keyed, caplog):
    learners_with_steps()
    app = instructor_page()
    for attempt in range(5):
        enter_key(app, f"wrong guess {attempt}")
        assert [e.value for e in app.error] == [
            f"That is not the instructor key. {4 - attempt} more tries this minute."
        ]
        assert not app.metric and not app.table

    enter_key(app, KEY)  # the sixth, right or not, is not even compared

    [refusal] = [e.value for e in app.error]
    assert refusal.startswith("Too many tries: 5 in a minute. Wait ") and refusal.endswith(
        " s, then try again."
    )
    wait = int(refusal.removeprefix("Too many tries: 5 in a minute. Wait ").split(" ")[0])
    assert 50 <= wait <= 60
    assert not app.metric and not app.table and "Create a user" not in texts(app)
    assert "wrong guess" not in caplog.text and KEY not in caplog.text


def test_with_the_right_key_the_funnel_counts_the_learners_checked_steps(keyed):
    checked = learners_with_steps()
    app = enter_key(instructor_page(), KEY)

    expected = {step.title: sum(step.key in done for done in checked.values()) for step in STEPS}
    assert funnel_shown(app) == expected
    assert expected["Create a user"] == 2 and expected["Initialize and see the two sample users"]
    [(spec, data)] = charts(app)
    assert dict(zip(data["step"], data["learners"], strict=True)) == {
        f"{step.section}. {step.title}" + (" (optional)" if step.optional else ""): expected[
            step.title
        ]
        for step in STEPS
    }
    assert {m.label: m.value for m in app.metric} == {"Active": "3", "Idle": "0", "Dormant": "0"}
    shown = texts(app)
    assert "This server process's learners only" in shown or "Every server's learners" in shown
    for sandbox_id in checked:  # never a learner's link (sandbox id) or their rows
        assert sandbox_id not in shown and f"{sandbox_id}@example.com" not in shown

    click(app, "Leave the instructor view")
    assert text_input(app, "Instructor key") and not app.table


def test_a_posted_message_shows_on_a_learners_page_as_plain_text_until_dismissed(keyed):
    learner = start_app()
    assert not [b for b in learner.button if b.label == "Dismiss"]  # nothing posted yet
    instructor = enter_key(instructor_page(), KEY)
    message = "**bold** <b>x</b> [link](http://example.com)"
    instructor.text_area[0].input(message)
    click(instructor, "Post to the class")
    assert message in [t.value for t in instructor.text]  # what the class sees, as it is

    learner.run()

    [shown] = [alert.value for alert in learner.info if "From your instructor" in alert.value]
    assert shown == f"**From your instructor:** {plain_text(message)}"
    assert "<b>" not in shown and "**bold**" not in shown and "](" not in shown
    click(learner, "Dismiss")
    assert not [a for a in learner.info if "From your instructor" in a.value]
    learner.run()
    assert not [a for a in learner.info if "From your instructor" in a.value]  # stays dismissed

    instructor.text_area[0].input("Break until 11:00")
    click(instructor, "Post to the class")
    learner.run()
    assert [a.value for a in learner.info if "From your instructor" in a.value] == [
        "**From your instructor:** Break until 11" + plain_text(":") + "00"
    ]
    click(instructor, "Clear the message")
    assert "No message is shown to the class." in texts(instructor)

    too_long = "x" * 281
    instructor.text_area[0].input(too_long)
    click(instructor, "Post to the class")
    assert any("at most 280 characters" in e.value for e in instructor.error)
    learner.run()
    assert not [a for a in learner.info if "From your instructor" in a.value]


def test_a_display_name_is_saved_and_shown_in_what_your_instructor_sees(keyed):
    learner = start_app()
    learner.session_state[SEES_KEY] = True  # the learner opens the collapsed expander
    learner.run()
    [sees] = [e for e in learner.sidebar.expander if e.label == "What your instructor sees"]
    assert "(the default name)" in sees.markdown[0].value

    text_input(learner, "Display name").input("x" * 41)
    click(learner, "Save name")
    assert any("at most 40 characters" in e.value for e in learner.sidebar.error)
    assert "(the default name)" in _sees_text(learner)

    text_input(learner, "Display name").input("  Ada_Lovelace  ")
    click(learner, "Save name")
    assert not learner.sidebar.error
    seen = _sees_text(learner)
    assert f"**Name:** {plain_text('Ada_Lovelace')}" in seen and "**State:** active" in seen

    runtime = get_runtime()
    overview = runtime.run(class_overview(runtime.instructor))
    sandbox_id = learner.session_state[SANDBOX_STATE_KEY]
    [line] = [line for line in overview.learners if line.display_name == "Ada_Lovelace"]
    assert line.state == "active" and sandbox_id not in seen


def test_the_key_may_come_from_streamlits_secrets(own_class):
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.secrets["instructor_key"] = KEY
    app.switch_page(INSTRUCTOR_PAGE)
    app.run()
    enter_key(app, KEY)
    assert {m.label for m in app.metric} == {"Active", "Idle", "Dormant"}
    assert button(app, "Leave the instructor view")


def _sees_text(app: AppTest) -> str:
    [sees] = [e for e in app.sidebar.expander if e.label == "What your instructor sees"]
    return "\n".join(m.value for m in sees.markdown)


def test_the_live_view_slows_after_a_minute_of_no_change_and_resumes(keyed):
    learners_with_steps()
    app = enter_key(instructor_page(), KEY)  # the first look
    for _ in range(STOP_AFTER_UNCHANGED - 2):  # each run draws the class once, as a refresh does
        app.run()
        assert LIVE_KEY in app.session_state and app.session_state[LIVE_KEY]
    app.run()  # the twelfth look at the same class: the page slows down

    assert not app.session_state[LIVE_KEY]
    assert "The live view slowed down" in texts(app)
    assert funnel_shown(app)["Create a user"] == 2  # the class is still shown, as last read
    click(app, "Resume live view")
    assert app.session_state[LIVE_KEY] and "slowed down" not in texts(app)

    for _ in range(STOP_AFTER_UNCHANGED - 2):
        app.run()
    get_runtime().lab(new_sandbox_id()).run(learner_progress)  # a newcomer: the class changed
    app.run()
    assert app.session_state[LIVE_KEY]


def test_a_slow_refresh_that_sees_a_change_goes_live_again(keyed):
    """Slowed down, the view still reads the class (a learner becomes stuck precisely while
    nothing changes); a change seen then makes it live again by itself."""
    learners_with_steps()
    app = enter_key(instructor_page(), KEY)
    for _ in range(STOP_AFTER_UNCHANGED - 1):
        app.run()
    assert not app.session_state[LIVE_KEY]
    app.run()  # a slow refresh, nothing new
    assert not app.session_state[LIVE_KEY]
    get_runtime().lab(new_sandbox_id()).run(learner_progress)  # a newcomer
    app.run()  # the next slow refresh sees them
    assert app.session_state[LIVE_KEY] and "slowed down" not in texts(app)
