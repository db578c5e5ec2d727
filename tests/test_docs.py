"""The documentation site builds with `mkdocs build --strict`: a broken link, a missing anchor, a
page left out of the navigation or a docstring mkdocstrings cannot read fails the build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly_with_the_cli_and_api_references(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in ("ingest", "run", "datasets", "drop-dataset", "--id-column", "--exact-decode"):
        assert command in cli, command  # generated from the click commands
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for method in ("Quarry.drop_dataset", "Quarry.list_datasets", "Quarry.ingest", "Job.wait"):
        assert f'id="quarry.client.{method}"' in api, method  # from the docstrings
