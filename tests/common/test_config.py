"""The settings and their documentation."""

from pathlib import Path

import pytest

from common.config import Settings

SETTINGS = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_settings_page_table(name: str) -> None:
    assert (
        f"| `{name.upper()}`" in SETTINGS
        or f"`{name.upper()}` /" in SETTINGS
        or f"/ `{name.upper()}`" in SETTINGS
    )
