"""Table patterns pg_dump cannot take (found by the API's schemathesis run: 500s): a pattern with
a control character (a NUL cannot even be passed to a process; refused by backup's own check)
or one pg_dump refuses as a regular expression (``dumpfilter.pattern_error``) is the user's
error, in one line: 400 over the API, exit 2 on the CLI, and no backup is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgkeeper.api import create_app
from pgkeeper.prefect_api import PrefectLink
from tests.support.api import AUTH, TestClient, assert_error, settings_for
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("field", "pattern", "words"),
    [
        ("excludeTables", "shop.\x00orders", "control character"),
        ("tables", "shop.orders\n", "control character"),
        ("tables", "shop.(orders", "table pattern is not valid"),
    ],
)
def test_the_api_refuses_patterns_pg_dump_cannot_take(
    sample_db: str, tmp_path: Path, field: str, pattern: str, words: str
) -> None:
    """POST /api/backups with such a pattern: 400 naming the problem; nothing stored."""
    backups = tmp_path / "backups"
    app = create_app(settings_for(sample_db, backups), prefect=PrefectLink(None, None))
    with TestClient(app) as client:
        response = client.post("/api/backups", json={field: [pattern]}, headers=AUTH)
    assert_error(response, 400, words)
    assert not backups.exists() or not any(backups.iterdir())


def test_the_cli_refuses_a_pattern_pg_dump_cannot_take(sample_db: str, tmp_path: Path) -> None:
    """`pgkeeper backup -t 'shop.(orders'`: exit 2, one line."""
    env = cli_env(sample_db, tmp_path / "backups")
    line = one_line_error(run_cli("backup", "-t", "shop.(orders", env=env, cwd=tmp_path), 2)
    assert "table pattern is not valid" in line
