"""Which file names are the seed's backups (pgkeeper.folder_import.seed_file), and the id and
time (UTC) each becomes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgkeeper.errors import UsageError
from pgkeeper.folder_import import seed_file


@pytest.mark.parametrize(
    ("file", "backup_id", "at"),
    [
        ("auto_backup_2025-10-02T10-00-00.sql.gz", "auto_backup_2025-10-02T10-00-00Z",
         datetime(2025, 10, 2, 10, tzinfo=UTC)),
        ("shop_2025-10-02T10-00-00.sql", "shop_2025-10-02T10-00-00Z",
         datetime(2025, 10, 2, 10, tzinfo=UTC)),
        ("manual_backup_2025-10-02T10-00-00-123Z.sql.gz", "manual_backup_2025-10-02T10-00-00.123Z",
         datetime(2025, 10, 2, 10, 0, 0, 123000, tzinfo=UTC)),
        ("x_2025-10-02T10-00-00Z.sql.gz", "x_2025-10-02T10-00-00Z",
         datetime(2025, 10, 2, 10, tzinfo=UTC)),
    ],
)  # fmt: skip
def test_seed_names_give_the_id_and_time(file: str, backup_id: str, at: datetime) -> None:
    """<name>_<YYYY-MM-DDTHH-MM-SS>.sql.gz (or .sql; milliseconds and Z allowed), in UTC."""
    seed = seed_file(Path(file))
    assert seed is not None and seed.backup_id == backup_id and seed.at == at


@pytest.mark.parametrize(
    "file",
    ["notes.txt", "backup.sql.gz", "shop_2025-10-02.sql.gz", "shop_2025-10-02T10-00-00.dump",
     "shop_2025-10-02T10-00-00.sql.gz.part", "2025-10-02T10-00-00.sql.gz"],
)  # fmt: skip
def test_other_names_are_not_seed_backups(file: str) -> None:
    """Anything else is not a seed backup (skipped, not failed)."""
    assert seed_file(Path(file)) is None


def test_a_seed_name_with_no_date_or_an_impossible_name_is_refused() -> None:
    """Named like a seed backup but unusable: a time that is no date, a name no id takes."""
    with pytest.raises(UsageError, match="is not a date"):
        seed_file(Path("shop_2025-02-30T10-00-00.sql.gz"))
    with pytest.raises(UsageError, match="is not allowed"):
        seed_file(Path("my shop_2025-02-03T10-00-00.sql.gz"))
