"""The layers hold: the lesson imports nothing of QuLab's, nothing imports upward, no cycles.

app.py → pages/ → classroom/ → source.py. Read from the files themselves (ast), so a new import
anywhere is checked the moment it is written.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LESSON_MAY_IMPORT = {"sqlalchemy", "redis", "fakeredis", "pandas"}
MAX_LINES = 600  # a file that grows past this is two files
MAX_LESSON_LINES = 1545  # 1,543: the relay's statements are built once (claim_statement…)


def python_files() -> list[Path]:
    """Every Python file of the app and its tools (tests excluded)."""
    files = [ROOT / "app.py", ROOT / "source.py"]
    for folder in ("classroom", "pages", "bench"):
        files.extend(sorted((ROOT / folder).rglob("*.py")))
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    )
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


OURS = ("source", "classroom", "pages", "app")


def our_imports(path: Path, known: set[str]) -> set[str]:
    """The project's own modules a file imports (a `from package import name` of a module too)."""
    return {name for name in imported_modules(path) if name in known and name != module_name(path)}


def test_the_lesson_imports_only_the_standard_library_sqlalchemy_and_redis():
    lesson = ROOT / "source.py"
    foreign = {
        name.split(".")[0]
        for name in imported_modules(lesson)
        if name and name.split(".")[0] not in sys.stdlib_module_names
    }
    assert foreign <= LESSON_MAY_IMPORT, f"source.py imports {sorted(foreign - LESSON_MAY_IMPORT)}"


def test_nothing_imports_upward():
    known = {module_name(path) for path in python_files()}
    for path in python_files():
        name, imports = module_name(path), our_imports(path, known)
        if name.startswith("classroom"):
            assert not {i for i in imports if i.startswith(("pages", "app"))}, (name, imports)
        if name.startswith("pages"):
            assert "app" not in imports, name


def test_the_import_graph_has_no_cycle():
    known = {module_name(path) for path in python_files()}
    graph = {module_name(path): our_imports(path, known) for path in python_files()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting, name])
        visiting.append(name)
        for imported in sorted(graph.get(name, ())):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_file_but_the_lesson_is_over_600_lines_and_the_lesson_reads_in_one_sitting():
    too_long = {
        str(path.relative_to(ROOT)): lines
        for path in python_files()
        if path.name != "source.py" and (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, too_long
    assert len((ROOT / "source.py").read_text().splitlines()) <= MAX_LESSON_LINES
