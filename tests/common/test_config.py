"""The settings and their documentation."""

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg.conninfo
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


SECRETS = {
    "DATABASE_URL": "postgresql://quarry:pw-owner-1@db.example:5432/quarry",
    "CELERY_BROKER_URL": "redis://default:pw-redis-2@redis.example:6379/0",
    "AWS_ACCESS_KEY_ID": "quarry-key",
    "AWS_SECRET_ACCESS_KEY": "pw-sss-3",
    "QUERY_ROLE_PASSWORD": "pw-reader-4",
    "WORKER_ROLE_PASSWORD": "pw-worker-5",
    "DISPATCHER_ROLE_PASSWORD": "pw-dispatcher-6",
    "SCALER_ROLE_PASSWORD": "pw-scaler-7",
}


def producer_config(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "producer"), "config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_producer_config_prints_no_password_wherever_it_is(tmp_path: Path) -> None:
    """Passwords in URLs and in their own settings, and one read from the env file, are masked."""
    env_file = tmp_path / "quarry.env"
    env_file.write_text("REDIS_PASSWORD=pw-from-file-8\n")
    shown = producer_config({**SECRETS, "QUARRY_ENV_FILE": str(env_file)})
    passwords = [*re.findall(r"pw-[a-z]+-\d", " ".join(SECRETS.values())), "pw-from-file-8"]
    assert len(passwords) == 8
    for password in passwords:
        assert password not in shown, password
    lines = dict(line.split("=", 1) for line in shown.splitlines())
    assert lines["DATABASE_URL"] == "postgresql://quarry:********@db.example:5432/quarry"
    assert lines["CELERY_BROKER_URL"] == "redis://default:********@redis.example:6379/0"
    assert lines["REDIS_PASSWORD"] == lines["WORKER_ROLE_PASSWORD"] == "********"
    assert lines["AWS_ACCESS_KEY_ID"] == "quarry-key"  # an identifier, shown
    keywords = producer_config({"DATABASE_URL": "host=db user=quarry password=pw-keyword-9 dbname=q"})
    assert "pw-keyword-9" not in keywords and "password=********" in keywords


def test_the_database_url_of_a_role_never_carries_the_owners_password() -> None:
    settings = Settings(database_url=SECRETS["DATABASE_URL"], worker_role_password="")
    assert "pw-owner-1" not in settings.worker_database_url
    assert psycopg.conninfo.conninfo_to_dict(settings.worker_database_url)["user"] == "quarry_worker"
