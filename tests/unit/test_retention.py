"""The retention planner: worked examples of every rule, and its invariants as property tests."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgkeeper.errors import ConfigError
from pgkeeper.manifest import Manifest, RestoreTest, StoredObject, Verification
from pgkeeper.retention import (
    Plan,
    Policy,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
    parse_target_overrides,
    plan,
    policy_for_target,
)
from pgkeeper.settings import Settings

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)  # a Sunday
_serial = 0


def _fresh_id(name: str = "auto_backup") -> str:
    """Ids that sort in creation order, unrelated to the recorded time (which orders backups)."""
    global _serial
    _serial += 1
    stamp = datetime(2001, 1, 1, tzinfo=UTC) + timedelta(seconds=_serial)
    return f"{name}_{stamp.strftime('%Y-%m-%dT%H-%M-%S')}Z"


def backup(
    when: datetime | str,
    state: str = "verified",
    *,
    backup_id: str | None = None,
    pinned: bool = False,
    size: int = 100,
    database: str = "app",
    server: str = "db:5432",
    checked_at: datetime | None = None,
) -> Manifest:
    """A manifest recorded at ``when``; ``state`` is verified, unverified or failed."""
    started = datetime.fromisoformat(when) if isinstance(when, str) else when
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    finished = started + timedelta(minutes=5)
    verification = None
    if state != "unverified":
        verification = Verification(ok=state == "verified", at=checked_at or finished)
    return Manifest(
        id=backup_id or _fresh_id(),
        name="auto_backup",
        database=database,
        server=server,
        format="custom",
        compression="zstd",
        objects=[StoredObject(name="x.dump.zst", size=size, sha256="0" * 64)],
        size=size,
        started_at=started,
        finished_at=finished,
        verification=verification,
        pinned=pinned,
    )


def only(**changes: Any) -> Policy:
    """A policy with every rule off except the ones given (min_backups defaults to 0 here)."""
    base: dict[str, Any] = {"keep_last": 0, "min_backups": 0}
    base.update(changes)
    return Policy(**base)


def kept(result: Plan) -> set[str]:
    return set(result.keep)


def reasons(result: Plan) -> dict[str, list[str]]:
    return {d.backup_id: d.reasons for d in result.decisions}


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("36h", timedelta(hours=36)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1y", timedelta(days=365)),
        ("90min", timedelta(minutes=90)),
        ("1d12h", timedelta(hours=36)),
        (" 12 hours ", timedelta(hours=12)),
        ("0", timedelta(0)),
    ],
)
def test_parse_duration_reads_the_documented_spellings(text: str, expected: timedelta) -> None:
    """Durations are a number and a unit (s, min, h, d, w, y), possibly several in a row."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "7x", "-1d", "h", "1d-2h", "7d!"])
def test_parse_duration_refuses_malformed_text_with_a_one_line_hint(text: str) -> None:
    """A malformed duration is a ConfigError naming the setting and showing valid examples."""
    with pytest.raises(ConfigError) as caught:
        parse_duration(text, "BACKUP_KEEP_WITHIN")
    message = str(caught.value)
    assert "BACKUP_KEEP_WITHIN" in message and "'7d'" in message and "\n" not in message


@pytest.mark.parametrize("text", ["30m", "2mo", "1month", "3 months"])
def test_parse_duration_refuses_months_as_ambiguous(text: str) -> None:
    """'m' and months are refused: minutes or months, and months vary in length."""
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_duration(text, "BACKUP_KEEP_WITHIN")


def test_format_duration_round_trips_and_reads_like_a_person_wrote_it() -> None:
    """format_duration gives '7d', '24h', '36h', '1y' and parse_duration reads them back."""
    for text in ("7d", "24h", "36h", "1y", "90min", "45s", "14d"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(timedelta(weeks=2)) == "14d"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50GB", 50 * 1000**3),
        ("1.5TiB", 1024**4 * 3 // 2),
        ("500MB", 500 * 1000**2),
        ("500M", 500 * 1024**2),
        ("10 kib", 10 * 1024),
        ("123", 123),
        ("0", 0),
    ],
)
def test_parse_size_reads_si_and_iec_units(text: str, expected: int) -> None:
    """Sizes: SI units are powers of 1000, IEC units and bare letters powers of 1024."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "50XB", "-1GB", "1,5GB", "fifty"])
def test_parse_size_refuses_malformed_text_with_a_one_line_hint(text: str) -> None:
    """A malformed size is a ConfigError naming the setting and showing valid examples."""
    with pytest.raises(ConfigError) as caught:
        parse_size(text, "BACKUP_MAX_TOTAL_SIZE")
    message = str(caught.value)
    assert "BACKUP_MAX_TOTAL_SIZE" in message and "'50GB'" in message and "\n" not in message


def test_format_size_shows_round_limits_as_written_and_other_sizes_in_iec() -> None:
    """format_size: '50 GB' for a round SI limit, '1.5 GiB' for a measured size."""
    assert format_size(50 * 1000**3) == "50 GB"
    assert format_size(1024**3 * 3 // 2) == "1.5 GiB"
    assert format_size(812) == "812 B"


# -- the policy ---------------------------------------------------------------------------------


def test_policy_from_settings_reads_every_retention_knob() -> None:
    """Policy.from_settings maps each BACKUP_* retention knob, parsing durations and sizes."""
    configured = Settings(
        backup_max_backups=10,
        backup_keep_hourly=24,
        backup_keep_daily=7,
        backup_keep_weekly=4,
        backup_keep_monthly=12,
        backup_keep_yearly=3,
        backup_keep_within="36h",
        backup_max_total_size="50GB",
        backup_min_backups=2,
        backup_failed_grace="48h",
        backup_usage_warn_bytes="40GB",
        backup_timezone="Europe/Paris",
        _env_file=None,
    )
    policy = Policy.from_settings(configured)
    assert policy == Policy(
        keep_last=10,
        hourly=24,
        daily=7,
        weekly=4,
        monthly=12,
        yearly=3,
        keep_within=timedelta(hours=36),
        max_total_size=50 * 1000**3,
        min_backups=2,
        failed_grace=timedelta(hours=48),
        require_verified=True,
        timezone="Europe/Paris",
        usage_warn_bytes=40 * 1000**3,
    )


def test_policy_from_settings_defaults_keep_the_seed_behaviour() -> None:
    """With no retention knobs set: keep the last 30 (BACKUP_MAX_BACKUPS), minimum 1, grace 24h."""
    policy = Policy.from_settings(Settings(_env_file=None))
    assert (policy.keep_last, policy.min_backups, policy.failed_grace) == (
        30,
        1,
        timedelta(hours=24),
    )
    assert policy.keep_within is None and policy.max_total_size is None


def test_policy_from_settings_with_verification_off_counts_unverified_backups() -> None:
    """BACKUP_VERIFY=off: unverified backups count as good, or rotation would delete them all."""
    policy = Policy.from_settings(Settings(backup_verify="off", _env_file=None))
    assert policy.require_verified is False


def test_policy_from_settings_names_the_malformed_knob() -> None:
    """A malformed BACKUP_KEEP_WITHIN is a ConfigError that names it."""
    with pytest.raises(ConfigError, match="BACKUP_KEEP_WITHIN"):
        Policy.from_settings(Settings(backup_keep_within="a week", _env_file=None))


def test_policy_refuses_an_unknown_time_zone() -> None:
    """An unknown time zone is a ConfigError that says what to use."""
    with pytest.raises(ConfigError, match="IANA"):
        Policy(timezone="Mars/Olympus")


def test_with_overrides_replaces_only_the_named_knobs() -> None:
    """Overrides use the settings' names without BACKUP_; 'off' turns a limit off."""
    base = Policy(keep_last=30, max_total_size=10, keep_within=timedelta(days=1))
    changed = base.with_overrides("keep_within=7d, keep_monthly=12; max_total_size=off")
    assert changed == Policy(keep_last=30, monthly=12, keep_within=timedelta(days=7))
    assert base.with_overrides("BACKUP_MAX_BACKUPS=5").keep_last == 5


@pytest.mark.parametrize("spec", ["keep_forever=1", "keep_daily", "keep_daily=many"])
def test_with_overrides_refuses_unknown_keys_and_bad_values(spec: str) -> None:
    """An override with an unknown key or a malformed value is a ConfigError naming the target."""
    with pytest.raises(ConfigError, match="for 's3'"):
        Policy().with_overrides(spec, "retention override for 's3'")


def test_policy_for_target_applies_kind_then_url_overrides() -> None:
    """Per-target policies: the kind's overrides apply first, then the exact URL's."""
    overrides = parse_target_overrides(
        '{"s3": "keep_monthly=12 max_backups=0", "s3://bkt/pg/": "keep_yearly=5", '
        '"local": "keep_within=7d"}'
    )
    s3 = policy_for_target(Policy(), overrides, "s3://bkt/pg", "s3")
    assert (s3.keep_last, s3.monthly, s3.yearly) == (0, 12, 5)
    local = policy_for_target(Policy(), overrides, "/var/backups", "local")
    assert local.keep_within == timedelta(days=7) and local.keep_last == 30
    assert policy_for_target(Policy(), overrides, "gs://b", "gcs") == Policy()


def test_parse_target_overrides_refuses_anything_but_an_object_of_strings() -> None:
    """BACKUP_RETENTION_TARGETS must be a JSON object from target to override text."""
    for bad in ("not json", "[1, 2]", '{"s3": 12}'):
        with pytest.raises(ConfigError, match="BACKUP_RETENTION_TARGETS"):
            parse_target_overrides(bad)
    assert parse_target_overrides(None) == {} and parse_target_overrides("") == {}


# -- worked examples ----------------------------------------------------------------------------


def test_keep_last_keeps_the_newest_n_by_recorded_time() -> None:
    """keep_last=3 keeps the three most recently recorded backups and deletes the rest."""
    history = [backup(NOW - timedelta(days=d)) for d in range(6)]
    result = plan(history, only(keep_last=3), NOW)
    assert kept(result) == {b.id for b in history[:3]}
    assert reasons(result)[history[0].id] == ["newest verified", "last 1/3"]
    assert reasons(result)[history[2].id] == ["last 3/3"]
    assert reasons(result)[history[3].id] == ["no rule keeps it"]


def test_daily_keeps_the_newest_backup_of_each_of_the_last_n_days_with_a_backup() -> None:
    """restic --keep-daily 3: the newest backup of each of the 3 newest days that have one.

    Days without a backup (here the 12th) are skipped, not counted.
    """
    history = [
        backup("2025-06-14T22:00:00+00:00"),  # daily 1/3 (newest of the 14th)
        backup("2025-06-14T02:00:00+00:00"),  # same day, older: not kept
        backup("2025-06-13T02:00:00+00:00"),  # daily 2/3
        backup("2025-06-11T23:00:00+00:00"),  # daily 3/3: the 12th has no backup
        backup("2025-06-11T02:00:00+00:00"),
        backup("2025-06-10T02:00:00+00:00"),  # a 4th day: over the count
    ]
    result = plan(history, only(daily=3), NOW)
    assert [reasons(result)[b.id] for b in history] == [
        ["newest verified", "daily 1/3"],
        ["no rule keeps it"],
        ["daily 2/3"],
        ["daily 3/3"],
        ["no rule keeps it"],
        ["no rule keeps it"],
    ]


def test_gfs_keeps_the_oldest_backup_while_counts_are_left_like_restic() -> None:
    """restic >= 0.16: when fewer than N periods have a backup, the oldest backup is kept too."""
    history = [
        backup("2025-06-14T20:00:00+00:00"),
        backup("2025-06-14T12:00:00+00:00"),
        backup("2025-06-14T04:00:00+00:00"),
    ]
    result = plan(history, only(daily=7), NOW)
    assert [reasons(result)[b.id] for b in history] == [
        ["newest verified", "daily 1/7"],
        ["no rule keeps it"],
        ["oldest daily 2/7"],
    ]


def test_gfs_rules_combine_and_each_walks_independently() -> None:
    """last 2 + daily 3 + weekly 2 + monthly 3: one backup may satisfy several rules at once.

    Weeks are ISO weeks (Monday first); 2025-06-15 is the Sunday closing week 24.
    """
    history = [
        backup("2025-06-15T02:00:00+00:00"),  # Sun, week 24, June
        backup("2025-06-14T02:00:00+00:00"),  # Sat, week 24
        backup("2025-06-13T02:00:00+00:00"),  # Fri, week 24
        backup("2025-06-09T02:00:00+00:00"),  # Mon, week 24
        backup("2025-06-08T02:00:00+00:00"),  # Sun, week 23
        backup("2025-06-01T02:00:00+00:00"),  # Sun, week 22, June
        backup("2025-05-31T02:00:00+00:00"),  # Sat, week 22, May
        backup("2025-05-01T02:00:00+00:00"),  # May
        backup("2025-04-30T02:00:00+00:00"),  # April
        backup("2025-03-15T02:00:00+00:00"),  # March: past the 3 months
    ]
    result = plan(history, only(keep_last=2, daily=3, weekly=2, monthly=3), NOW)
    assert [reasons(result)[b.id] for b in history] == [
        ["newest verified", "last 1/2", "daily 1/3", "weekly 1/2", "monthly 1/3"],
        ["last 2/2", "daily 2/3"],
        ["daily 3/3"],
        ["no rule keeps it"],
        ["weekly 2/2"],
        ["no rule keeps it"],
        ["monthly 2/3"],
        ["no rule keeps it"],
        ["monthly 3/3"],
        ["no rule keeps it"],
    ]


def test_weekly_uses_iso_weeks_across_the_year_boundary() -> None:
    """2024-12-30 (Mon) and 2025-01-02 share ISO week 2025-W01; 2024-12-29 is 2024-W52.

    Years stay calendar years: 2024-12-30 is the newest backup of 2024.
    """
    history = [
        backup("2025-01-02T02:00:00+00:00"),
        backup("2024-12-30T02:00:00+00:00"),
        backup("2024-12-29T02:00:00+00:00"),
        backup("2024-12-22T02:00:00+00:00"),
    ]
    result = plan(history, only(weekly=2, yearly=2), datetime(2025, 1, 3, tzinfo=UTC))
    assert [reasons(result)[b.id] for b in history] == [
        ["newest verified", "weekly 1/2", "yearly 1/2"],
        ["yearly 2/2"],
        ["weekly 2/2"],
        ["no rule keeps it"],
    ]


def test_hourly_keeps_the_newest_backup_of_each_hour() -> None:
    """keep_hourly=2 with three backups in the newest hour keeps one of them and the next hour's."""
    history = [
        backup("2025-06-15T11:50:00+00:00"),
        backup("2025-06-15T11:20:00+00:00"),
        backup("2025-06-15T11:05:00+00:00"),
        backup("2025-06-15T10:55:00+00:00"),
        backup("2025-06-15T09:55:00+00:00"),
    ]
    result = plan(history, only(hourly=2), NOW)
    assert kept(result) == {history[0].id, history[3].id}


def test_periods_are_drawn_in_the_configured_time_zone() -> None:
    """BACKUP_TIMEZONE: 23:30 and 00:30 UTC are two UTC days but one day in Europe/Paris (+2)."""
    history = [
        backup("2025-06-14T00:30:00+00:00"),  # Paris: 14th 02:30
        backup("2025-06-13T23:30:00+00:00"),  # Paris: 14th 01:30
        backup("2025-06-13T20:00:00+00:00"),  # Paris: 13th 22:00
    ]
    utc = plan(history, only(daily=2), NOW)
    paris = plan(history, only(daily=2, timezone="Europe/Paris"), NOW)
    assert kept(utc) == {history[0].id, history[1].id}
    assert kept(paris) == {history[0].id, history[2].id}


def test_keep_within_keeps_every_good_backup_younger_than_the_age() -> None:
    """keep_within=7d keeps every verified backup recorded in the last 7 days, no more."""
    history = [backup(NOW - timedelta(days=d, hours=1)) for d in range(10)]
    result = plan(history, only(keep_within=timedelta(days=7)), NOW)
    assert kept(result) == {b.id for b in history[:7]}
    assert reasons(result)[history[6].id] == ["within 7d"]


def test_backups_failing_for_weeks_never_empty_the_store() -> None:
    """Every verified backup is past keep_within and newer ones all failed: the minimum stays.

    (The scenario of invariant 3: age-based retention would otherwise delete the last good ones.)
    """
    good = [backup(NOW - timedelta(days=30 + d)) for d in range(5)]
    failed = [backup(NOW - timedelta(days=d, hours=3), "failed") for d in range(20)]
    policy = only(keep_within=timedelta(days=7), min_backups=3)
    result = plan(good + failed, policy, NOW)
    assert kept(result) == {b.id for b in good[:3]} | {failed[0].id}
    assert reasons(result)[good[0].id] == ["newest verified", "minimum count 1/3"]
    assert reasons(result)[failed[0].id] == ["failed verification, in grace"]
    assert reasons(result)[failed[1].id] == ["failed verification"]


def test_a_failed_backup_never_pushes_a_good_one_out_of_keep_last() -> None:
    """Two newer zero-byte failed dumps do not take places in 'keep the last 3'."""
    good = [backup(NOW - timedelta(days=3 + d)) for d in range(4)]
    failed = [backup(NOW - timedelta(days=d + 2), "failed", size=0) for d in range(2)]
    result = plan(good + failed, only(keep_last=3), NOW)
    assert kept(result) == {b.id for b in good[:3]}
    assert all(reasons(result)[b.id] == ["failed verification"] for b in failed)


def test_unverified_backups_are_kept_in_grace_and_never_counted() -> None:
    """A fresh unverified backup is kept for the grace period without taking a 'last' place."""
    fresh = backup(NOW - timedelta(hours=2), "unverified")
    stale = backup(NOW - timedelta(days=3), "unverified")
    good = [backup(NOW - timedelta(days=1 + d)) for d in range(3)]
    result = plan([fresh, stale, *good], only(keep_last=2), NOW)
    assert reasons(result)[fresh.id] == ["unverified, in grace"]
    assert reasons(result)[stale.id] == ["unverified past grace"]
    assert kept(result) == {fresh.id, good[0].id, good[1].id}


def test_failed_grace_counts_from_the_failed_check() -> None:
    """A backup found corrupt by a late re-verify is kept for the grace from that check on."""
    old = backup(NOW - timedelta(days=60), "failed", checked_at=NOW - timedelta(hours=1))
    result = plan([backup(NOW - timedelta(days=1)), old], only(), NOW)
    assert reasons(result)[old.id] == ["failed verification, in grace"]


def test_pinned_backups_are_kept_whatever_their_state_or_age() -> None:
    """Pinned: a year-old verified backup and a corrupt one past grace are both kept."""
    history = [
        backup(NOW - timedelta(days=1)),
        backup(NOW - timedelta(days=365), pinned=True),
        backup(NOW - timedelta(days=200), "failed", pinned=True),
    ]
    result = plan(history, only(keep_last=1), NOW)
    assert kept(result) == {b.id for b in history}
    assert reasons(result)[history[2].id] == ["pinned"]


def test_a_backup_kept_until_a_time_is_protected_until_then_and_ordinary_after() -> None:
    """keep_until (a restore's safety backup) protects like a pin until that time, size limit
    included, and afterwards the policy decides as for any backup."""
    newest = backup(NOW - timedelta(hours=1))
    safety = backup(NOW - timedelta(days=2)).model_copy(
        update={"keep_until": NOW + timedelta(days=5)}
    )
    unverified = backup(NOW - timedelta(days=3), "unverified").model_copy(
        update={"keep_until": NOW + timedelta(hours=1)}
    )
    result = plan([newest, safety, unverified], only(keep_last=1, max_total_size=100), NOW)
    assert kept(result) == {newest.id, safety.id, unverified.id}
    assert any(r.startswith("kept until") for r in reasons(result)[safety.id])
    later = plan([newest, safety, unverified], only(keep_last=1), NOW + timedelta(days=6))
    assert kept(later) == {newest.id}


def test_size_limit_deletes_the_oldest_unprotected_backups_first() -> None:
    """max_total_size=350 over five 100-byte backups: the two oldest go, 'over size limit'."""
    history = [backup(NOW - timedelta(days=d)) for d in range(5)]
    result = plan(history, only(keep_last=5, min_backups=1, max_total_size=350), NOW)
    assert kept(result) == {b.id for b in history[:3]}
    assert reasons(result)[history[4].id] == ["over size limit (was: last 5/5)"]
    assert result.kept_size == 300 and not result.warnings


def test_size_limit_never_deletes_protected_backups_and_says_so() -> None:
    """When the newest verified, minimum count and pinned backups alone are over the limit, they
    stay and the plan warns."""
    history = [
        backup(NOW - timedelta(days=1), size=500),
        backup(NOW - timedelta(days=2), size=500),
        backup(NOW - timedelta(days=3), size=500, pinned=True),
        backup(NOW - timedelta(days=4), size=500),
    ]
    result = plan(history, only(keep_last=4, min_backups=2, max_total_size=100), NOW)
    assert kept(result) == {b.id for b in history[:3]}
    assert any("over the size limit" in w for w in result.warnings)


def test_size_limit_ignores_unverified_and_failed_backups() -> None:
    """A huge unverified backup in grace does not make the size limit delete a good one."""
    history = [
        backup(NOW - timedelta(hours=1), "unverified", size=10_000),
        backup(NOW - timedelta(days=1)),
        backup(NOW - timedelta(days=2)),
    ]
    result = plan(history, only(keep_last=5, max_total_size=250), NOW)
    assert kept(result) == {b.id for b in history}


def test_held_backups_are_kept_with_the_callers_reason_if_good() -> None:
    """hold (rotation: 'not yet uploaded') keeps good backups only, and yields to the size limit."""
    good = [backup(NOW - timedelta(days=d)) for d in range(1, 4)]
    failed = backup(NOW - timedelta(days=5), "failed")
    hold = {m.id: "not yet uploaded to s3://b" for m in [*good, failed]}
    result = plan([*good, failed], only(), NOW, hold=hold)
    assert kept(result) == {m.id for m in good}
    assert reasons(result)[good[2].id] == ["not yet uploaded to s3://b"]
    assert reasons(result)[failed.id] == ["failed verification"]
    trimmed = plan(good, only(max_total_size=150), NOW, hold=hold)
    assert kept(trimmed) == {good[0].id}


def test_order_is_the_recorded_time_not_the_name_or_the_id() -> None:
    """Ids that sort the other way round (a renamed series, a reset clock) do not change it."""
    early_name = backup(NOW - timedelta(days=1), backup_id="zzz_2020-01-01T00-00-00Z")
    late_name = backup(NOW - timedelta(days=5), backup_id="aaa_2030-01-01T00-00-00Z")
    result = plan([late_name, early_name], only(keep_last=1), NOW)
    assert result.keep == [early_name.id]
    assert [d.backup_id for d in result.decisions] == [early_name.id, late_name.id]


def test_a_backup_from_the_future_sorts_newest_and_is_reported() -> None:
    """Clock skew: a backup recorded tomorrow is the newest verified, and the plan warns."""
    skewed = backup(NOW + timedelta(days=1))
    history = [backup(NOW - timedelta(days=d)) for d in range(1, 4)]
    result = plan([*history, skewed], only(keep_last=2), NOW)
    assert kept(result) == {skewed.id, history[0].id}
    assert any("future" in w and skewed.id in w for w in result.warnings)


def test_each_database_on_a_server_is_planned_on_its_own() -> None:
    """Two databases on one target: keep_last=2 keeps two of each, not two in all."""
    app = [backup(NOW - timedelta(hours=d), database="app") for d in range(1, 4)]
    crm = [backup(NOW - timedelta(days=d), database="crm") for d in range(1, 4)]
    result = plan(app + crm, only(keep_last=2), NOW)
    assert kept(result) == {app[0].id, app[1].id, crm[0].id, crm[1].id}


def test_with_verification_off_unverified_backups_count_as_good() -> None:
    """require_verified=False: unverified backups fill counts; failed ones still never do."""
    history = [
        backup(NOW - timedelta(days=1, hours=1), "failed"),
        backup(NOW - timedelta(days=2), "unverified"),
        backup(NOW - timedelta(days=3), "unverified"),
        backup(NOW - timedelta(days=4), "unverified"),
    ]
    result = plan(history, only(keep_last=2, require_verified=False), NOW)
    assert kept(result) == {history[1].id, history[2].id}
    assert reasons(result)[history[1].id] == ["newest", "last 1/2"]


def test_no_verified_backup_is_a_warning() -> None:
    """A target with no verified backup at all is reported: nothing there is known to restore."""
    result = plan([backup(NOW - timedelta(hours=1), "unverified")], Policy(), NOW)
    assert any("no verified backup of app@db:5432" in w for w in result.warnings)
    assert plan([], Policy(), NOW).decisions == []


def test_naive_times_are_read_as_utc() -> None:
    """A manifest with a naive timestamp (hand-made, imported) is taken as UTC, not local time."""
    naive = backup(NOW - timedelta(days=1))
    naive = naive.model_copy(update={"started_at": naive.started_at.replace(tzinfo=None)})
    result = plan([naive], only(keep_within=timedelta(hours=25)), NOW.replace(tzinfo=None))
    assert result.decisions[0].reasons == ["newest verified", "within 25h"]


# -- property tests -----------------------------------------------------------------------------

STATES = ("verified", "verified", "verified", "unverified", "failed")
GROUPS = (("app", "db:5432"), ("app", "db:5432"), ("crm", "db:5432"), ("app", "other:5432"))
MINUTES_PER_YEAR = 400 * 24 * 60

# Offsets are minutes before NOW. Some histories are spread over a year, some crowded into a
# few hours (many backups in one period); a few land in the future (clock skew).
offsets = st.one_of(
    st.integers(min_value=-3 * 24 * 60, max_value=MINUTES_PER_YEAR),
    st.integers(min_value=0, max_value=6 * 60),
    st.integers(min_value=24 * 60, max_value=24 * 60 + 90),
)
entries = st.tuples(
    offsets,
    st.sampled_from(STATES),
    st.sampled_from([False, False, False, True]),  # pinned
    st.integers(min_value=0, max_value=500),
    st.sampled_from(GROUPS),
    st.integers(min_value=0, max_value=5 * 24 * 60),  # check delay after the backup finished
)
policies = st.builds(
    Policy,
    keep_last=st.integers(0, 6),
    hourly=st.integers(0, 4),
    daily=st.integers(0, 5),
    weekly=st.integers(0, 4),
    monthly=st.integers(0, 4),
    yearly=st.integers(0, 2),
    keep_within=st.one_of(st.none(), st.integers(0, 60 * 24).map(lambda h: timedelta(hours=h))),
    max_total_size=st.one_of(st.none(), st.integers(0, 3000)),
    min_backups=st.integers(0, 4),
    failed_grace=st.integers(0, 96).map(lambda h: timedelta(hours=h)),
    require_verified=st.sampled_from([True, True, True, False]),
    timezone=st.sampled_from(["UTC", "Europe/Paris", "America/Los_Angeles", "Asia/Kolkata"]),
)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(raw: Sequence[tuple[int, str, bool, int, tuple[str, str], int]]) -> list[Manifest]:
    """Manifests from generated tuples; ids are unique and unrelated to time order."""
    history = []
    for offset, state, pinned, size, (database, server), delay in raw:
        started = NOW - timedelta(minutes=offset)
        checked = started + timedelta(minutes=5 + delay)
        history.append(
            backup(
                started,
                state,
                pinned=pinned,
                size=size,
                database=database,
                server=server,
                checked_at=checked,
            )
        )
    return history


def is_good(m: Manifest, policy: Policy) -> bool:
    return not m.verification_failed and (m.verified or not policy.require_verified)


def group_of(m: Manifest) -> tuple[str, str]:
    return (m.database, m.server)


def by_time(history: Sequence[Manifest]) -> list[Manifest]:
    return sorted(history, key=lambda m: (m.started_at, m.finished_at, m.id), reverse=True)


histories = st.lists(entries, max_size=40).map(build)


@PROPERTY
@given(history=histories, policy=policies)
def test_property_every_backup_gets_exactly_one_decision_with_a_reason(
    history: list[Manifest], policy: Policy
) -> None:
    """Every backup is decided once, newest first, and every decision names at least one rule."""
    result = plan(history, policy, NOW)
    assert sorted(d.backup_id for d in result.decisions) == sorted(m.id for m in history)
    assert [d.backup_id for d in result.decisions] == [m.id for m in by_time(history)]
    assert all(d.reasons for d in result.decisions)


@PROPERTY
@given(history=histories, policy=policies)
def test_property_the_newest_verified_backup_is_never_deleted(
    history: list[Manifest], policy: Policy
) -> None:
    """Invariant 1: the newest good backup of each database (hence of the target) is kept."""
    result = plan(history, policy, NOW)
    groups = {group_of(m) for m in history}
    for group in groups:
        good = [m for m in by_time(history) if group_of(m) == group and is_good(m, policy)]
        if good:
            assert result.decision(good[0].id).keep
    good_anywhere = [m for m in by_time(history) if m.verified]
    if good_anywhere:
        assert result.decision(good_anywhere[0].id).keep


@PROPERTY
@given(history=histories, policy=policies)
def test_property_bad_backups_only_ever_kept_by_grace_or_pin(
    history: list[Manifest], policy: Policy
) -> None:
    """Invariant 2: failed/unverified backups satisfy no keep rule; kept in grace, then deleted."""
    result = plan(history, policy, NOW)
    for m in history:
        if is_good(m, policy):
            continue
        decision = result.decision(m.id)
        if m.verification_failed:
            assert m.verification is not None
            in_grace = NOW - m.verification.at <= policy.failed_grace
            grace_reason = "failed verification, in grace"
        else:
            in_grace = NOW - m.finished_at <= policy.failed_grace
            grace_reason = "unverified, in grace"
        assert decision.keep == (in_grace or m.pinned)
        if decision.keep:
            assert set(decision.reasons) <= {grace_reason, "pinned"}


@PROPERTY
@given(good=histories, bad=st.lists(entries, max_size=15).map(build), policy=policies)
def test_property_bad_backups_never_push_a_good_one_out(
    good: list[Manifest], bad: list[Manifest], policy: Policy
) -> None:
    """Invariant 2: adding failed/unverified backups never changes any good backup's decision."""
    good = [m for m in good if is_good(m, policy)]
    bad = [m for m in bad if not is_good(m, policy)]
    alone = plan(good, policy, NOW)
    mixed = plan(good + bad, policy, NOW)
    for m in good:
        assert mixed.decision(m.id) == alone.decision(m.id)


@PROPERTY
@given(history=histories, policy=policies)
def test_property_the_minimum_count_of_good_backups_is_never_undercut(
    history: list[Manifest], policy: Policy
) -> None:
    """Invariant 3: each database keeps at least min_backups good backups (or all it has)."""
    result = plan(history, policy, NOW)
    for group in {group_of(m) for m in history}:
        good = [m for m in history if group_of(m) == group and is_good(m, policy)]
        kept_good = [m for m in good if result.decision(m.id).keep]
        assert len(kept_good) >= min(policy.min_backups, len(good))


@PROPERTY
@given(raw=st.lists(entries, max_size=30), min_backups=st.integers(1, 5))
def test_property_minimum_holds_when_every_backup_is_older_than_the_age_limit(
    raw: list[tuple[int, str, bool, int, tuple[str, str], int]], min_backups: int
) -> None:
    """Invariant 3, the 'failing for weeks' case: all older than keep_within, no other rule."""
    history = build([(offset + 60 * 24 * 60, *rest) for offset, *rest in raw])  # type: ignore[misc]
    policy = Policy(keep_last=0, keep_within=timedelta(days=7), min_backups=min_backups)
    result = plan(history, policy, NOW)
    for group in {group_of(m) for m in history}:
        good = by_time([m for m in history if group_of(m) == group and m.verified])
        assert all(result.decision(m.id).keep for m in good[:min_backups])


@PROPERTY
@given(history=histories, policy=policies)
def test_property_pinned_backups_are_never_deleted(history: list[Manifest], policy: Policy) -> None:
    """Invariant 4: a pinned backup is kept, with 'pinned' among its reasons."""
    result = plan(history, policy, NOW)
    for m in history:
        if m.pinned:
            assert result.decision(m.id).keep and "pinned" in result.decision(m.id).reasons


@PROPERTY
@given(history=histories, policy=policies, seed=st.integers(0, 2**32 - 1))
def test_property_order_comes_from_recorded_time_not_ids_or_input_order(
    history: list[Manifest], policy: Policy, seed: int
) -> None:
    """Invariant 6: shuffling the input or renaming every id (reversing their sort order) gives
    the same decisions."""
    result = plan(history, policy, NOW)
    shuffled = list(history)
    random.Random(seed).shuffle(shuffled)
    assert plan(shuffled, policy, NOW).decisions == result.decisions

    # Rename so the id that sorted first sorts last. Ids break exact ties of recorded time (to
    # be deterministic), so this only holds when every recorded time is distinct.
    times = [(m.started_at, m.finished_at) for m in history]
    if len(set(times)) == len(times):
        names = sorted(m.id for m in history)
        renamed_to = dict(zip(names, reversed(names), strict=True))
        renamed = [m.model_copy(update={"id": renamed_to[m.id]}) for m in history]
        again = plan(renamed, policy, NOW)
        for m in history:
            before = result.decision(m.id)
            after = again.decision(renamed_to[m.id])
            assert (after.keep, after.reasons) == (before.keep, before.reasons)


@PROPERTY
@given(history=histories, policy=policies)
def test_property_size_limit_deletes_oldest_first_and_only_unprotected(
    history: list[Manifest], policy: Policy
) -> None:
    """Size: kept good backups fit the limit unless only protected ones are left; every backup
    deleted for size is older than every unprotected good backup that is kept."""
    result = plan(history, policy, NOW)
    if policy.max_total_size is None:
        assert not any("over size limit" in r for d in result.decisions for r in d.reasons)
        return
    protected_words = ("newest", "minimum count", "pinned")
    by_id = {m.id: m for m in history}
    kept_good = [d for d in result.decisions if d.keep and is_good(by_id[d.backup_id], policy)]
    unprotected = [
        d for d in kept_good if not any(r.startswith(protected_words) for r in d.reasons)
    ]
    if sum(d.size for d in kept_good) > policy.max_total_size:
        assert not unprotected
        assert any("over the size limit" in w for w in result.warnings)
    evicted = [d for d in result.decisions if d.reasons[0].startswith("over size limit")]
    for gone in evicted:
        assert by_id[gone.backup_id].verified or not policy.require_verified
        for stay in unprotected:
            assert (stay.recorded_at or NOW) >= (gone.recorded_at or NOW)


def _restic_oracle(good: Sequence[Manifest], rule: str, count: int, policy: Policy) -> set[str]:
    """restic's --keep-<rule> N, stated declaratively: the newest backup of each of the N newest
    periods that have one, plus the oldest backup when fewer than N periods have one."""
    keys = {
        "hourly": "%Y-%m-%d %H",
        "daily": "%Y-%m-%d",
        "monthly": "%Y-%m",
        "yearly": "%Y",
    }
    tz = policy.tz

    def period(m: Manifest) -> str:
        local = m.started_at.astimezone(tz)
        if rule == "weekly":
            year, week, _ = local.isocalendar()
            return f"{year}-W{week:02d}"
        return str(local.strftime(keys[rule]))

    newest_of: dict[str, Manifest] = {}
    for m in by_time(good):
        newest_of.setdefault(period(m), m)
    periods = list(newest_of)  # in walk order: newest period first
    chosen = {newest_of[p].id for p in periods[:count]}
    if good and len(periods) < count:
        chosen.add(by_time(good)[-1].id)
    return chosen


@PROPERTY
@given(
    history=histories,
    rule=st.sampled_from(["hourly", "daily", "weekly", "monthly", "yearly"]),
    count=st.integers(1, 6),
    timezone=st.sampled_from(["UTC", "Europe/Paris", "Pacific/Chatham"]),
)
def test_property_gfs_rules_match_restic_semantics(
    history: list[Manifest], rule: str, count: int, timezone: str
) -> None:
    """Each GFS rule alone keeps exactly what restic's forget --keep-<rule> would keep."""
    policy = Policy(keep_last=0, min_backups=0, timezone=timezone, **{rule: count})
    good = [m for m in history if m.verified and not m.pinned]
    result = plan(good, policy, NOW)
    expected = _restic_oracle(
        [m for m in good if group_of(m) == group_of(good[0])] if good else [], rule, count, policy
    )
    first_group = {
        d.backup_id
        for d in result.decisions
        if good and d.keep and d.group == result.decision(good[0].id).group
    }
    # The newest verified backup is kept on its own too; restic keeps it as well (newest period).
    assert first_group == expected


def _restore_tested(manifest: Manifest, ok: bool, at: datetime) -> Manifest:
    mismatches = [] if ok else ["orders: 10 rows restored, 12 dumped"]
    test = RestoreTest(
        ok=ok, at=at, duration_seconds=1.0, server="staging:5432", mismatches=mismatches
    )
    return manifest.model_copy(update={"restore_tests": [*manifest.restore_tests, test]})


def test_a_backup_whose_restore_test_failed_counts_as_failed_not_as_verified() -> None:
    """A verified backup that then failed its restore test does not restore to what was
    dumped: it takes no 'last' place, is not the protected newest verified backup, and is
    kept only for the grace period counted from the failed test."""
    good = [backup(NOW - timedelta(days=2 + d)) for d in range(3)]
    failed_test = _restore_tested(backup(NOW - timedelta(days=1)), False, NOW - timedelta(hours=2))
    result = plan([failed_test, *good], only(keep_last=2), NOW)
    assert kept(result) == {good[0].id, good[1].id, failed_test.id}
    assert reasons(result)[good[0].id][0] == "newest verified"
    assert reasons(result)[failed_test.id] == ["failed its restore test, in grace"]
    later = plan([failed_test, *good], only(keep_last=2), NOW + timedelta(days=2))
    assert failed_test.id not in kept(later)
    assert reasons(later)[failed_test.id] == ["failed its restore test"]


def test_a_restore_test_passing_again_makes_the_backup_count_again() -> None:
    """Only the last restore test counts: a flaky failure followed by a pass is verified."""
    tested = _restore_tested(backup(NOW - timedelta(days=1)), False, NOW - timedelta(hours=5))
    assert (tested.verified, tested.verification_failed, tested.state) == (
        False, True, "restore-failed",
    )  # fmt: skip
    assert tested.failed_at == NOW - timedelta(hours=5)
    passed = _restore_tested(tested, True, NOW - timedelta(hours=1))
    assert (passed.verified, passed.verification_failed, passed.state) == (
        True, False, "verified",
    )  # fmt: skip
    assert reasons(plan([passed], only(keep_last=1), NOW))[passed.id][0] == "newest verified"


def test_base_backups_are_a_group_of_their_own_beside_globals_dumps() -> None:
    """A server's base backups (PITR, database '*') and its globals dumps (database '*' too)
    are planned apart: keep_last 1 keeps the newest of each, never one for the other."""
    globals_dump = backup("2025-03-02T00:00:00").model_copy(
        update={"database": "*", "kind": "globals"}
    )
    old_base = backup("2025-03-01T00:00:00").model_copy(update={"database": "*", "kind": "base"})
    new_base = backup("2025-03-01T12:00:00").model_copy(update={"database": "*", "kind": "base"})
    result = plan([globals_dump, old_base, new_base], only(keep_last=1), NOW)
    assert kept(result) == {globals_dump.id, new_base.id}
    assert result.decision(new_base.id).group == "base *@db:5432"
