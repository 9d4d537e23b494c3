"""Running the real `pgkeeper` command in tests: a clean environment and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PGKEEPER = Path(sys.executable).with_name("pgkeeper")
STRIPPED = ("DATABASE_URL", "STAGING_DATABASE_URL", "BACKUP_", "AWS_", "GCS_", "PG", "GOOGLE_")


def cli_env(url: str | None, backup_dir: Path, **extra: str) -> dict[str, str]:
    """The developer's environment without anything that points pgkeeper elsewhere, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED)}
    if url is not None:
        env["DATABASE_URL"] = url
    env["BACKUP_DIR"] = str(backup_dir)
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `pgkeeper ARGS` (in `cwd`, so no stray .env is read) and capture its output."""
    return subprocess.run(
        [str(PGKEEPER), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the command failed with `code` and one stderr line, no traceback; return it."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines[0].startswith("error: ")
    return lines[0]
