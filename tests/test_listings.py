"""Every listing a page shows is short enough for one screen, and the main ones are the lesson.

A page shows code with show_code(...) (or source_code(...)), read from the running source. These
tests find every such call in pages/ (ast), resolve what it lists, and read its source.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import source

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "pages").glob("*.py"))
MAX_LISTING_LINES = 60


def _page_namespace(tree: ast.Module) -> dict:
    """The page's imports and its module-level tuples of code objects, evaluated (nothing drawn)."""
    namespace: dict = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "<page imports>", "exec"), namespace)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            try:
                value = eval(compile(ast.Expression(node.value), "<listing>", "eval"), namespace)
            except Exception:
                continue
            for target in node.targets:
                if isinstance(target, ast.Name):
                    namespace[target.id] = value
    return namespace


def listings() -> list[tuple[str, str, object]]:
    """(page, label, code object) for every code object a page lists."""
    found = []
    for page in PAGES:
        tree = ast.parse(page.read_text())
        namespace = _page_namespace(tree)
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call) or getattr(call.func, "id", "") != "show_code":
                continue
            label = next((k.value.value for k in call.keywords if k.arg == "label"), "")
            for argument in call.args:
                starred = isinstance(argument, ast.Starred)
                expression = ast.Expression(argument.value if starred else argument)
                value = eval(compile(expression, "<listing>", "eval"), namespace)
                for code_object in value if starred else (value,):
                    found.append((page.name, label, code_object))
    return found


LISTINGS = listings()


def test_the_pages_list_code():
    assert len({page for page, _, _ in LISTINGS}) >= 4, LISTINGS


@pytest.mark.parametrize(
    "page, label, code_object",
    LISTINGS,
    ids=[f"{page}:{getattr(code, '__qualname__', code)}" for page, _, code in LISTINGS],
)
def test_every_listing_is_at_most_60_lines(page, label, code_object):
    lines = inspect.getsource(code_object).splitlines()
    assert len(lines) <= MAX_LISTING_LINES, f"{page} lists {len(lines)} lines under {label!r}"


def test_the_cache_and_the_publisher_are_shown_as_the_plain_pattern():
    read = inspect.getsource(source.ReadThroughCache.read)
    assert len(read.splitlines()) <= 20
    for step in ("self.get(key)", "self.load(", "self.set(key"):
        assert step in read
    loop = inspect.getsource(source.run_publisher)
    assert len(loop.splitlines()) <= 25
    assert "publish_due_batch()" in loop
    shown = {code for _, _, code in LISTINGS}
    assert source.ReadThroughCache.read in shown
    assert source.run_publisher in shown
