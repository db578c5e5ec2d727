"""`producer run --wait` as a user sees it on a terminal: a bar redrawn in place while it follows
the job and, when nothing moves, one line saying what to start."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import WITH_IMAGES, PrivateDatabase
from tests.stack import BIN


def on_a_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `command` with its stderr on a pseudo-terminal; (exit status, what the terminal got)."""
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    received = b""
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # the command ended: no one holds the terminal any more
            break
        if not data:
            break
        received += data
    os.close(controller)
    process.communicate(timeout=60)
    return process.returncode, received.decode(errors="replace")


def test_wait_draws_a_bar_and_says_no_dispatcher_is_alive_when_nothing_moves(
    private_database: PrivateDatabase,
) -> None:
    with private_database("following", STALL_WARNING_S="1") as env:  # no dispatcher ever ran on it
        code, shown = on_a_terminal(
            [
                str(BIN / "producer"),
                "run",
                "--query",
                f"{WITH_IMAGES} LIMIT 20",
                "--wait",
                "--wait-timeout",
                "5",
            ],
            env,
        )
    assert code == 1, shown  # it stopped following before the job finished
    assert "\r[------------------------------] 0/20 done · 0 failed · 0.0 img/s · " in shown, shown
    assert (
        shown.count("no progress for 1 s: no dispatcher has been seen ever: start `producer dispatch`") == 1
    )
