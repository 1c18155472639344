"""Guard for the one private Streamlit attribute QuLab touches (see pages/common/__init__.py's
docstring).

open_page() leaves Streamlit's old pages/ mode by setting PagesManager.uses_pages_directory. It is
private, so requirements.txt pins Streamlit to the minor version this was tested on. If an upgrade
moves or drops the switch, this test fails with what to do, instead of deep links silently opening
pages without app.py's frame.
"""

import importlib.metadata

from streamlit.runtime.pages_manager import PagesManager

TESTED_MINOR = (1, 67)


def test_streamlit_still_has_the_private_pages_switch_that_open_page_flips():
    assert hasattr(PagesManager, "uses_pages_directory"), (
        "Streamlit no longer has PagesManager.uses_pages_directory, which "
        "pages/common/__init__.py's open_page() sets to leave the old pages/ mode. Check what a "
        "deep link such as /caching does right after a restart with this Streamlit version "
        "(tests/e2e/test_browser_deep_links.py), then update open_page() and the pin in "
        "requirements.txt."
    )


def test_streamlit_is_the_minor_version_the_switch_was_tested_on():
    installed = tuple(int(part) for part in importlib.metadata.version("streamlit").split(".")[:2])
    assert installed == TESTED_MINOR, (
        f"Streamlit {installed[0]}.{installed[1]} is installed; open_page() was tested on "
        f"{TESTED_MINOR[0]}.{TESTED_MINOR[1]}. Run tests/e2e/test_browser_deep_links.py on it, "
        "then move TESTED_MINOR here and the pin in requirements.txt together."
    )


def test_streamlit_still_has_what_the_reconnect_patch_uses():
    """pages/common/reconnect.py wraps AppSession.request_rerun and reads the session's fragment
    storage: a learner whose process died must not find every demo click ignored afterwards."""
    from streamlit.runtime.app_session import AppSession
    from streamlit.runtime.fragment import MemoryFragmentStorage

    assert callable(getattr(AppSession, "request_rerun", None))
    assert callable(getattr(AppSession, "has_fragment", None))
    assert callable(getattr(AppSession, "_handle_scriptrunner_event_on_event_loop", None))
    assert "_fragment_storage" in AppSession.__init__.__code__.co_names, (
        "AppSession no longer keeps its fragments in _fragment_storage: update "
        "pages/common/reconnect.py before moving the pin in requirements.txt."
    )
    assert isinstance(MemoryFragmentStorage()._fragments, dict), (
        "Streamlit's fragment storage changed: update pages/common/reconnect.py (and check "
        "tests/e2e/test_browser_replicas.py) before moving the pin in requirements.txt."
    )


def _theme_of_a_new_session() -> bytes:
    """The theme sections of a new-session message, built in the order Streamlit builds them."""
    from streamlit import config
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from streamlit.runtime import app_session

    message = ForwardMsg()
    theme = message.new_session.custom_theme
    app_session._populate_theme_msg(theme)
    for category in config.CustomThemeCategories:
        section = theme
        for part in category.value.split("."):
            section = getattr(section, part)
        app_session._populate_theme_msg(section, f"theme.{category.value}")
    return message.SerializeToString()


def test_the_theme_is_read_from_the_configuration_once_and_is_the_message_streamlit_builds(
    monkeypatch,
):
    """pages/common/theme_message.py keeps each theme section Streamlit builds for every run."""
    from streamlit import config
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from streamlit.runtime import app_session

    from pages.common.theme_message import build_theme_once

    build = app_session._populate_theme_msg
    monkeypatch.setattr(app_session, "_populate_theme_msg", getattr(build, "__wrapped__", build))
    as_streamlit_builds = _theme_of_a_new_session()
    build_theme_once()
    config.get_config_options(force_reparse=True)  # starts from nothing built
    sections_read = []
    read = config.get_options_for_section

    def counted(section: str) -> dict:
        sections_read.append(section)
        return read(section)

    monkeypatch.setattr(config, "get_options_for_section", counted)
    assert [_theme_of_a_new_session() for _ in range(3)] == [as_streamlit_builds] * 3
    assert len(sections_read) == len(set(sections_read)) == 6  # each section read once, not 18
    shown = ForwardMsg.FromString(as_streamlit_builds).new_session.custom_theme
    assert shown.primary_color == "#3056d3"  # .streamlit/config.toml's, in what is sent
