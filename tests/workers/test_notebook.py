"""examples/quickstart.ipynb, executed top to bottom on a real kernel against the real stack."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]
NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs_and_its_job_adds_up(
    ingested: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    monkeypatch.setenv("QUARRY_FIGURES", str(tmp_path))  # the kernel inherits this environment
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    last = notebook.cells[-1].outputs[-1]["text"].strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["state"] == "finished"
    assert summary["rows"] == summary["items"] > 0
    assert summary["failed"] == 0 and summary["classified"] == summary["items"]
    assert len(summary["selected"]) >= 2 and summary["matrix_rows"] == summary["selected"]
    for figure in ("preview.png", "confusion.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
