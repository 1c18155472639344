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
