"""The library layer does not reach back into the CLI: quarry/ never imports producer/."""

import ast
from pathlib import Path

QUARRY = Path(__file__).resolve().parents[2] / "quarry"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_nothing_under_quarry_imports_producer() -> None:
    offenders = {
        f"{path.name}: {name}"
        for path in sorted(QUARRY.glob("*.py"))
        for name in imported_modules(path)
        if name == "producer" or name.startswith("producer.")
    }
    assert len(list(QUARRY.glob("*.py"))) >= 6  # the API and the library modules behind it
    assert offenders == set()
