"""Bad command-line usage is one line on stderr with exit code 2, like every other bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PGKEEPER = Path(sys.executable).parent / "pgkeeper"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["backup", "--nope"], "No such option: --nope"),
        (["restore"], "Missing argument"),
        (["backup", "--jobs", "many"], "Invalid value for '--jobs'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    """A usage mistake prints `error: ... (see '... --help')` on one line and exits 2."""
    proc = subprocess.run(
        [str(PGKEEPER), *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "--help" in lines[0]


def test_help_still_works(tmp_path: Path) -> None:
    """`--help` and a bare `pgkeeper` print the help and exit 0."""
    for args in (["--help"], [], ["backup", "--help"]):
        proc = subprocess.run(
            [str(PGKEEPER), *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert proc.returncode == 0, proc
        assert "Usage" in proc.stdout
