"""Progress on the pages through AppTest: the sidebar's count and a section's list follow the
actions."""

from __future__ import annotations

import re

import pytest
from pagetools import (
    button,
    click,
    initialize_in_section_2,
    lab_of,
    open_page,
    reload,
    start_app,
    text_input,
)
from streamlit.testing.v1 import AppTest

import source
from classroom.progress.steps import STEPS
from classroom.sandboxes.reset import initialize_sandbox

REQUIRED = sum(not step.optional for step in STEPS)


@pytest.fixture
def app(fresh_global_runtime) -> AppTest:
    return start_app()


def sidebar_count(app: AppTest) -> int:
    """The N of the sidebar's 'N of M steps'."""
    texts = [str(element.proto.text) for element in app.sidebar.get("progress")]
    counts = [re.search(r"(\d+) of (\d+) steps", text) for text in texts]
    found = [match for match in counts if match]
    assert len(found) == 1, texts
    assert int(found[0].group(2)) == REQUIRED
    return int(found[0].group(1))


def section_list(app: AppTest) -> str:
    """The section's progress list and its next step (the markdown inside its expander)."""
    panels = [
        expander
        for expander in app.main.expander
        if re.fullmatch(r"\d+ of \d+ steps done", expander.label)
    ]
    assert len(panels) == 1, [expander.label for expander in app.main.expander]
    return "\n".join(shown_text(element.value) for element in panels[0].markdown)


def recaps(app: AppTest) -> list[str]:
    """The one-line recaps shown once a section is complete."""
    return [
        shown_text(element.value)
        for element in app.main.markdown
        if str(element.value).startswith("✅ **Section")
    ]


def shown_text(markdown: str) -> str:
    """Markdown as a reader sees it: journal text is escaped (pages.common.plain_text), the reader
    sees it plain."""
    return re.sub(r"\\(.)", r"\1", str(markdown))


def test_the_sidebar_count_follows_the_learners_actions_and_survives_a_reload(app):
    assert sidebar_count(app) == 0
    lab_of(app).run(source.create_user, email="learner@example.com", name="Learner")
    assert sidebar_count(reload(app)) == 1
    lab_of(app).run(initialize_sandbox)
    lab_of(app).run(source.create_user, email="learner@example.com", name="Learner Again")
    reloaded = reload(app)
    assert sidebar_count(reloaded) == 2  # a second user is no new step
    assert [
        c.value
        for c in reloaded.sidebar.caption
        if c.value.startswith("Next: section 3, add three sample")
    ]
    assert [
        b
        for b in reloaded.sidebar.get("download_button")
        if "Download my sandbox" in str(b.proto.label)
    ]


def test_section_1_lists_its_step_and_the_recap_once_the_form_created_a_user(app):
    open_page(app, "pages/data_models.py")
    assert "Create a user**: not yet" in section_list(app)
    assert not recaps(app)
    text_input(app, "Email").input("learner@example.com")
    text_input(app, "Name").input("Learner")
    button(app, "Create User").click().run()
    assert "Create a user**: done" in section_list(app)  # counted in the run that created the user
    assert [recap for recap in recaps(app) if "Section 1 complete" in recap]


def test_section_3_lists_its_steps_done_and_not_yet_and_the_next_one(app):
    lab_of(app).run(initialize_sandbox)
    open_page(app, "pages/repository_n_plus_one.py")
    alex = next(user.id for user in lab_of(app).run(source.list_users) if user.name == "Alex Smith")
    text_input(app, "User ID").input(alex).run()
    click(app, "Add 3 Sample Scores for User")
    click(app, "Fetch User & Scores (Eager Loading)")
    listed = section_list(app)
    assert "Add three sample scores**: done" in listed
    assert "Fetch with eager loading**: done" in listed
    assert "Fetch with N+1**: not yet" in listed  # an eager fetch is not the N+1 step
    assert "**Next:** Fetch with N+1." in listed
    assert not recaps(app)

    click(app, "Fetch User & Scores (Simulated N+1)")
    assert "not yet" not in section_list(app).split("(optional)")[0]
    assert [
        recap
        for recap in recaps(app)
        if "Section 3 complete" in recap and "N+1 ran 5 statements" in recap
    ]


def test_a_done_step_whose_rows_were_deleted_since_says_so_and_how_to_see_it_again(app):
    open_page(app, "pages/data_models.py")
    text_input(app, "Email").input("learner@example.com")
    text_input(app, "Name").input("Learner")
    click(app, "Create User")
    assert "Create a user**: done. User " in section_list(app)

    initialize_in_section_2(app)  # deletes that user (and creates Alex Smith and Jane Doe)
    open_page(app, "pages/data_models.py")
    listed = section_list(app)
    assert "Create a user**: done, but what it showed was deleted since" in listed
    assert 'To see it again: Enter an email and a name, then click "Create User".' in listed
    assert sidebar_count(reload(app)) == 2  # still done: the step happened
