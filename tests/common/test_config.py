"""The settings and their documentation."""

from pathlib import Path

import pytest

from common.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme_table(name: str) -> None:
    assert (
        f"| `{name.upper()}`" in README or f"`{name.upper()}` /" in README or f"/ `{name.upper()}`" in README
    )
