"""The README's commands, run as it shows them: its worked example's shell lines through the real
CLI and its Python block on the API, against the test stack (pools, dispatcher, PostgreSQL, S3),
with img2dataset's output standing in for `./laion`. Every `make` target it names is one that a
test (or CI itself) runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.stack import Stack

pytestmark = pytest.mark.usefixtures("own_datasets")
README = Path(__file__).resolve().parents[2] / "README.md"
# where each `make` target of the README runs: tests/deploy/test_local_stack.py (up, down, build,
# demo), tests/test_docs.py (docs); .ci/run runs install, lint and test themselves
TESTED_TARGETS = {"up", "down", "build", "demo", "docs", "install", "lint", "test"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def shell_commands(block: str) -> list[list[str]]:
    """Each command of a shell block as its words: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands, pending = [], ""
    for line in joined.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quoted query going on over the next line
            continue
        if words:
            commands.append(words)
        pending = ""
    assert not pending, f"unterminated quote in the README: {pending}"
    return commands


def test_every_make_target_the_readme_names_is_run_by_a_test() -> None:
    named = set(re.findall(r"`make ([a-z-]+)", README.read_text())) | {
        words[1] for block in blocks("bash") for words in shell_commands(block) if words[0] == "make"
    }
    assert named and named <= TESTED_TARGETS, named - TESTED_TARGETS
    assert len(README.read_text().splitlines()) <= 150  # the front door; the reference is in docs/


def test_the_worked_example_runs_as_written(
    workers: Stack, ingested: dict[str, str], img2dataset_shards: Path, tmp_path: Path
) -> None:
    """`ingested` first: the sample's dataset outlives this test, as other tests expect."""
    test_env = ingested
    example = next(block for block in blocks("bash") if "producer ingest" in block)
    places = {"./laion": str(img2dataset_shards), "results.parquet": str(tmp_path / "results.parquet")}
    last_job = None
    ran = []
    for words in shell_commands(example):
        if words == ["source", ".venv/bin/activate"]:
            continue
        assert words[0] == "producer", words
        arguments = [places.get(word, word) for word in words[1:]]
        arguments = [last_job if word == "JOB_ID" else word for word in arguments]
        result = run_cli(*arguments, env=test_env, check=False)  # type: ignore[arg-type]
        assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr}"
        if arguments[0] == "run":
            last_job = result.stdout.strip().splitlines()[-1]
        ran.append(arguments[0])
    assert ran == ["ingest", "run", "ingest", "run", "datasets", "jobs", "results", "drop-dataset"]
    assert (tmp_path / "results.parquet").stat().st_size > 0

    (code,) = blocks("python")
    python = code.replace('"./laion"', repr(str(img2dataset_shards)))
    namespace: dict[str, object] = {}
    exec(compile(python, "README.md", "exec"), namespace)
    frame = namespace["job"].results(catalog=True)  # type: ignore[attr-defined]
    assert len(frame) > 0 and set(frame["status"]) == {"done"} and "caption" in frame.columns
    assert set(frame["status_catalog"]) == {"success"}  # img2dataset's own status column, kept apart
