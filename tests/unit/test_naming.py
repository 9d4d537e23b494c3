"""Backup ids and storage keys: the shape users may pass, and what can never become a path."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pgkeeper import naming
from pgkeeper.errors import InvalidBackupIdError, UsageError

WHEN = datetime(2025, 10, 2, 10, 0, 0, 123456, tzinfo=UTC)


def test_make_id_has_the_documented_shape() -> None:
    """An id is `<name>_<UTC timestamp>` with dashes in the time, like the design's example."""
    assert naming.make_id("auto_backup", WHEN) == "auto_backup_2025-10-02T10-00-00Z"


def test_make_id_with_millis() -> None:
    """The millisecond form keeps three digits and still validates."""
    backup_id = naming.make_id("auto_backup", WHEN, millis=True)
    assert backup_id == "auto_backup_2025-10-02T10-00-00.123Z"
    assert naming.validate_id(backup_id) == backup_id


def test_make_id_converts_to_utc() -> None:
    """A start time in another zone is written as UTC."""
    from datetime import timedelta, timezone

    local = datetime(2025, 10, 2, 12, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert naming.make_id("x", local) == "x_2025-10-02T10-00-00Z"


@pytest.mark.parametrize("millis", [False, True])
def test_parse_format_round_trip(millis: bool) -> None:
    """parse_id gives back the name and the start time make_id was given (to the precision kept)."""
    backup_id = naming.make_id("nightly-db_1", WHEN, millis=millis)
    name, when = naming.parse_id(backup_id)
    assert name == "nightly-db_1"
    expected = WHEN.replace(microsecond=123000 if millis else 0)
    assert when == expected
    assert when.tzinfo is not None
    assert naming.make_id(name, when, millis=millis) == backup_id


def test_ids_sort_by_time_within_a_name() -> None:
    """Ids of one name sort in start-time order as strings."""
    earlier = naming.make_id("n", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
    later = naming.make_id("n", datetime(2025, 11, 2, 3, 4, 5, tzinfo=UTC))
    assert sorted([later, earlier]) == [earlier, later]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../etc/passwd",
        "a/b",
        "auto_backup_2025-10-02T10-00-00Z/../x",
        "../auto_backup_2025-10-02T10-00-00Z",
        "/auto_backup_2025-10-02T10-00-00Z",
        "auto_backup_2025-10-02T10-00-00Z/",
        "file:///etc/passwd",
        "s3://bucket/auto_backup_2025-10-02T10-00-00Z",
        "https://example.com/x",
        "auto_backup",
        "auto_backup_2025-10-02T10:00:00Z",
        "auto_backup_2025-10-02T10-00-00",
        "auto_backup_2025-10-02T10-00-00.12Z",
        ".hidden_2025-10-02T10-00-00Z",
        "_x_2025-10-02T10-00-00Z",
        "a b_2025-10-02T10-00-00Z",
        "auto_backup_2025-10-02T10-00-00Z\n",
        "x" * 64 + "_2025-10-02T10-00-00Z",
        "x" * 5000,
    ],
)
def test_validate_id_rejects_anything_but_the_id_shape(bad: str) -> None:
    """Paths, urls, empty and over-long strings are never accepted as ids (exit code 2)."""
    with pytest.raises(InvalidBackupIdError) as info:
        naming.validate_id(bad)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    assert "pgkeeper list" in message


def test_validate_id_message_hides_very_long_input() -> None:
    """A huge id is not echoed back whole: the message stays one short line."""
    with pytest.raises(InvalidBackupIdError) as info:
        naming.validate_id("y" * 5000)
    assert "y" * 200 not in str(info.value)
    assert len(str(info.value)) < 300


def test_longest_allowed_name_is_accepted() -> None:
    """A 63-character name is the longest that makes a valid id."""
    name = "n" * 63
    assert naming.validate_id(naming.make_id(name, WHEN)) == f"{name}_2025-10-02T10-00-00Z"


@pytest.mark.parametrize("bad", ["", "-x", "_x", "a/b", "..", "a.b", "n" * 64, "a b"])
def test_validate_name_rejects_unsafe_names(bad: str) -> None:
    """A backup name must be 1-63 letters, digits, '_' or '-' starting with a letter or digit."""
    with pytest.raises(UsageError):
        naming.validate_name(bad)
    with pytest.raises(UsageError):
        naming.make_id(bad, WHEN)


def test_keys_live_under_the_backup_folder() -> None:
    """Manifest, pending marker and data objects are keyed `<id>/...`."""
    backup_id = naming.make_id("b", WHEN)
    assert naming.manifest_key(backup_id) == f"{backup_id}/manifest.json"
    assert naming.pending_key(backup_id) == f"{backup_id}/pending.json"
    assert naming.object_key(backup_id, "x.dump.zst") == f"{backup_id}/x.dump.zst"
    assert naming.object_key(backup_id, "d.dir/toc.dat") == f"{backup_id}/d.dir/toc.dat"


@pytest.mark.parametrize("relative", ["..", "../x", "a/../../x", "a/..", "/etc/passwd", ""])
def test_object_key_refuses_escaping_names(relative: str) -> None:
    """An object name from a manifest can never climb out of its backup folder."""
    backup_id = naming.make_id("b", WHEN)
    with pytest.raises(InvalidBackupIdError):
        naming.object_key(backup_id, relative)


def test_key_builders_validate_the_id() -> None:
    """Every key builder refuses a path-like id."""
    for build in (naming.manifest_key, naming.pending_key, naming.backup_prefix):
        with pytest.raises(InvalidBackupIdError):
            build("../etc")
    with pytest.raises(InvalidBackupIdError):
        naming.object_key("../etc", "x")


@pytest.mark.parametrize(
    ("fmt", "compression", "suffix"),
    [
        ("custom", "zstd", ".dump.zst"),
        ("custom", "gzip", ".dump.gz"),
        ("custom", "none", ".dump"),
        ("plain", "zstd", ".sql.zst"),
        ("plain", "gzip", ".sql.gz"),
        ("plain", "none", ".sql"),
        ("directory", "zstd", ".dir"),
        ("directory", "gzip", ".dir"),
        ("directory", "none", ".dir"),
    ],
)
def test_data_name_extension(fmt: str, compression: str, suffix: str) -> None:
    """The data file name is the id plus the extension of its format and compression."""
    backup_id = naming.make_id("b", WHEN)
    assert naming.data_name(backup_id, fmt, compression) == backup_id + suffix


def test_id_from_key() -> None:
    """Keys inside the layout map to their backup id; others (temp files, strays) to None."""
    backup_id = naming.make_id("b", WHEN)
    assert naming.id_from_key(f"{backup_id}/manifest.json") == backup_id
    assert naming.id_from_key(f"{backup_id}/x/y") == backup_id
    assert naming.id_from_key(".pgkeeper-restore-abc/x") is None
    assert naming.id_from_key("README") is None
