"""The monitor's checks as pure functions of what the targets hold and the time: freshness
against the schedule, verification, restore tests, offsite copies, usage, listing errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgkeeper import naming
from pgkeeper.errors import PgkeeperError
from pgkeeper.manifest import CheckResult, Manifest, RestoreTest, StoredObject, Verification
from pgkeeper.monitor import (
    Expectations,
    Holdings,
    check_freshness,
    check_offsite,
    check_restore_test,
    check_storage,
    check_usage,
    check_verified,
    evaluate,
    raise_for_failure,
)
from pgkeeper.rotate import TargetUsage, UsageReport

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
DAILY = Expectations(backup_interval=timedelta(days=1))  # stale after 1.5 d + 30 min
LOCAL, S3 = "file:///backups", "s3://bkt/pg"


def backup(
    age: timedelta,
    state: str = "verified",
    tests: list[tuple[timedelta, bool]] | None = None,
    took: timedelta = timedelta(minutes=5),
) -> Manifest:
    """A manifest of a backup started ``age`` before NOW, with restore tests (age, passed)."""
    started = NOW - age
    finished = started + took
    backup_id = naming.make_id("auto_backup", started)
    verification = None
    if state != "unverified":
        checks = [] if state == "verified" else [CheckResult(name="checksum", ok=False)]
        verification = Verification(ok=state == "verified", at=finished, checks=checks)
    return Manifest(
        id=backup_id,
        name="auto_backup",
        database="app",
        server="db:5432",
        format="custom",
        compression="zstd",
        objects=[StoredObject(name="x.dump.zst", size=10, sha256="0" * 64)],
        size=10,
        started_at=started,
        finished_at=finished,
        verification=verification,
        restore_tests=[
            RestoreTest(
                ok=ok,
                at=NOW - test_age,
                duration_seconds=12.0,
                server="staging:5432",
                mismatches=[] if ok else ["shop.orders: 1 rows restored, the snapshot had 2"],
            )
            for test_age, ok in tests or []
        ],
    )


def held(*backups: Manifest, offsite: dict[str, list[str]] | None = None) -> Holdings:
    """Holdings of the primary (every backup) and offsite targets (url -> ids they hold)."""
    offsite = offsite or {}
    locations = {
        m.id: [LOCAL, *(url for url, ids in offsite.items() if m.id in ids)] for m in backups
    }
    return Holdings(backups=list(backups), locations=locations, targets=[LOCAL, *offsite])


# -- freshness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "status"),
    [
        (timedelta(hours=2), "ok"),
        (timedelta(hours=36), "ok"),  # a missed daily run is not yet an alarm
        (timedelta(hours=36, minutes=30), "ok"),  # exactly the limit
        (timedelta(hours=36, minutes=31), "failed"),
        (timedelta(days=3), "failed"),
    ],
)
def test_freshness_fails_past_interval_times_one_and_a_half_plus_grace(
    age: timedelta, status: str
) -> None:
    """The newest backup may be up to interval x 1.5 + grace old; older is stale."""
    check = check_freshness([backup(age)], DAILY, NOW)

    assert check.status == status
    if status == "failed":
        assert "started" in check.detail and "check the backup runs" in check.detail


def test_freshness_uses_the_newest_backup_whatever_its_list_position_says() -> None:
    """An old backup next to a fresh one does not make the system stale."""
    assert check_freshness([backup(timedelta(hours=1)), backup(timedelta(days=9))], DAILY, NOW).ok


def test_no_backup_at_all_is_stale() -> None:
    """With a schedule and no complete backup, freshness fails and says how to make one."""
    check = check_freshness([], DAILY, NOW)

    assert check.status == "failed" and "pgkeeper backup" in check.detail


def test_without_an_active_schedule_freshness_is_skipped() -> None:
    """No active backup schedule (BACKUP_ENABLED=false): nothing is due, nothing is stale."""
    check = check_freshness([backup(timedelta(days=30))], Expectations(None), NOW)

    assert check.status == "skipped" and check.ok


def test_the_grace_and_factor_are_the_callers() -> None:
    """Expectations set the limit: hourly with 10 minutes' grace is stale after 1h40m."""
    hourly = Expectations(backup_interval=timedelta(hours=1), grace=timedelta(minutes=10))

    assert hourly.max_backup_age == timedelta(minutes=100)
    assert check_freshness([backup(timedelta(minutes=99))], hourly, NOW).ok
    assert not check_freshness([backup(timedelta(minutes=101))], hourly, NOW).ok


# -- verified ----------------------------------------------------------------------------------


def test_a_verified_newest_backup_passes() -> None:
    """The newest backup passed verification: ok, saying which level and when."""
    check = check_verified([backup(timedelta(hours=3))], DAILY, NOW)

    assert check.status == "ok" and "passed full verification" in check.detail


def test_a_newest_backup_that_failed_verification_fails_even_if_older_ones_are_good() -> None:
    """Verification failed on the newest: the check fails naming the failed check."""
    backups = [backup(timedelta(hours=3), "corrupt"), backup(timedelta(days=1))]

    check = check_verified(backups, DAILY, NOW)

    assert check.status == "failed"
    assert "failed verification (checksum)" in check.detail


def test_a_newest_backup_that_failed_its_restore_test_fails_the_check() -> None:
    """A verified backup whose last restore test failed is not one to rely on: the check fails
    with the mismatch; a later passing test makes it ok again."""
    failed = backup(timedelta(hours=3), tests=[(timedelta(hours=1), False)])
    check = check_verified([failed], DAILY, NOW)
    assert check.status == "failed"
    assert "failed its restore test (shop.orders: 1 rows restored" in check.detail
    again = backup(
        timedelta(hours=3), tests=[(timedelta(hours=2), False), (timedelta(hours=1), True)]
    )
    assert check_verified([again], DAILY, NOW).status == "ok"


def test_an_unverified_newest_backup_is_pending_within_grace_then_fails() -> None:
    """Verification runs after the dump: within the grace period it is pending, after it the
    unverified backup fails the check with the command to run."""
    young = backup(timedelta(minutes=20), "unverified")
    old = backup(timedelta(hours=2), "unverified")

    assert check_verified([young], DAILY, NOW).status == "ok"
    assert "pending" in check_verified([young], DAILY, NOW).detail
    late = check_verified([old], DAILY, NOW)
    assert late.status == "failed" and f"pgkeeper verify {old.id}" in late.detail


def test_with_verification_off_an_unverified_backup_is_not_a_failure() -> None:
    """BACKUP_VERIFY=off: an unverified newest backup is skipped, a corrupt one still fails."""
    off = Expectations(timedelta(days=1), verification=False)

    assert check_verified([backup(timedelta(hours=5), "unverified")], off, NOW).status == "skipped"
    assert check_verified([backup(timedelta(hours=5), "corrupt")], off, NOW).status == "failed"


# -- restore-test ------------------------------------------------------------------------------


def test_a_recent_passed_restore_test_of_any_backup_passes() -> None:
    """The restore test may be of an older backup than the newest: the newest test counts."""
    backups = [
        backup(timedelta(hours=1)),
        backup(timedelta(days=3), tests=[(timedelta(days=2), True)]),
    ]

    check = check_restore_test(backups, DAILY, NOW)

    assert check.status == "ok" and "passed a restore test 2d ago" in check.detail


def test_a_restore_test_that_left_grants_out_passes_and_says_what_was_not_tested() -> None:
    """Staging lacking a role the backup names is staging's gap, not the backup's: the test
    passed on what it tested, the backup stays verified, and the check's line says that its
    grants were not tested and which role staging lacks."""
    partial = RestoreTest(
        ok=True, at=NOW - timedelta(hours=2), duration_seconds=3.0, server="staging:5432",
        missing_roles=["shop_app"], untested=["grants"],
        checks=[CheckResult(name="ownership and grants", ok=True, skipped=True, detail="...")],
    )  # fmt: skip
    newest = backup(timedelta(hours=3)).model_copy(update={"restore_tests": [partial]})

    tested = check_restore_test([newest], DAILY, NOW)
    verified = check_verified([newest], DAILY, NOW)

    assert tested.status == "ok", tested.detail
    assert tested.detail.endswith(
        "; grants not tested: staging (staging:5432) has no role shop_app"
    ), tested.detail
    assert verified.status == "ok" and newest.state == "verified"


def test_the_newest_restore_test_failing_fails_even_after_an_older_pass() -> None:
    """A failed newest restore test fails the check, with its mismatches."""
    backups = [
        backup(timedelta(days=1), tests=[(timedelta(hours=2), False)]),
        backup(timedelta(days=8), tests=[(timedelta(days=7), True)]),
    ]

    check = check_restore_test(backups, DAILY, NOW)

    assert check.status == "failed"
    assert "FAILED" in check.detail and "shop.orders" in check.detail


def test_a_restore_test_older_than_the_limit_fails() -> None:
    """A passed restore test 15 days ago is too old for the 14-day default."""
    backups = [
        backup(timedelta(hours=1)),
        backup(timedelta(days=16), tests=[(timedelta(days=15), True)]),
    ]

    check = check_restore_test(backups, DAILY, NOW)

    assert check.status == "failed" and "more than 14d" in check.detail
    three_weeks = Expectations(timedelta(days=1), restore_test_max_age=timedelta(days=21))
    assert check_restore_test(backups, three_weeks, NOW).ok


def test_before_the_first_restore_test_the_limit_counts_from_the_oldest_backup() -> None:
    """A new installation has the limit's time to run its first restore test; then never
    having one fails."""
    young = [backup(timedelta(hours=1)), backup(timedelta(days=5))]
    old = [backup(timedelta(hours=1)), backup(timedelta(days=20))]

    assert check_restore_test(young, DAILY, NOW).status == "ok"
    assert "first is due by" in check_restore_test(young, DAILY, NOW).detail
    assert check_restore_test(old, DAILY, NOW).status == "failed"


def test_the_restore_test_check_can_be_switched_off() -> None:
    """restore_test_max_age None: the check is skipped."""
    off = Expectations(timedelta(days=1), restore_test_max_age=None)

    assert check_restore_test([backup(timedelta(days=30))], off, NOW).status == "skipped"


# -- offsite -----------------------------------------------------------------------------------


def test_the_newest_backup_on_every_offsite_target_passes() -> None:
    """Every offsite target holds the newest backup: ok."""
    newest = backup(timedelta(hours=3))

    assert check_offsite(held(newest, offsite={S3: [newest.id]}), DAILY, NOW).status == "ok"


def test_an_offsite_target_lacking_the_newest_backup_fails() -> None:
    """An offsite target has older backups but not the newest: fail, naming the target and
    the command that copies it."""
    newest, older = backup(timedelta(hours=3)), backup(timedelta(days=1))

    check = check_offsite(held(newest, older, offsite={S3: [older.id]}), DAILY, NOW)

    assert check.status == "failed"
    assert f"{S3} lacks the newest backup {newest.id}" in check.detail
    assert f"pgkeeper upload {newest.id}" in check.detail


def test_an_upload_still_running_within_grace_is_pending() -> None:
    """A backup finished minutes ago may still be uploading: not yet a failure."""
    newest = backup(timedelta(minutes=15), took=timedelta(minutes=1))

    check = check_offsite(held(newest, offsite={S3: []}), DAILY, NOW)

    assert check.status == "ok" and "pending" in check.detail


def test_a_corrupt_newest_backup_is_not_expected_offsite() -> None:
    """A backup that failed verification is never uploaded: the newest good one is checked."""
    corrupt, good = backup(timedelta(hours=2), "corrupt"), backup(timedelta(days=1))

    assert check_offsite(held(corrupt, good, offsite={S3: [good.id]}), DAILY, NOW).ok


def test_without_offsite_targets_the_check_is_skipped() -> None:
    """Only a primary target: nothing to check offsite."""
    assert check_offsite(held(backup(timedelta(hours=1))), DAILY, NOW).status == "skipped"


def test_an_offsite_target_that_cannot_be_listed_fails_even_within_grace() -> None:
    """An unreachable offsite target is a failure, not a pending upload."""
    newest = backup(timedelta(minutes=10), took=timedelta(minutes=1))
    holdings = held(newest, offsite={S3: []})
    holdings.errors[S3] = "access denied"

    check = check_offsite(holdings, DAILY, NOW)

    assert check.status == "failed" and f"{S3} could not be listed" in check.detail
    assert check_storage(holdings).status == "failed"
    assert "cannot list s3://bkt/pg: access denied" in check_storage(holdings).detail


# -- usage and the report ----------------------------------------------------------------------


def _usage(*warnings: str, errors: dict[str, str] | None = None) -> UsageReport:
    return UsageReport(
        targets=[TargetUsage(LOCAL, "local", 2_400_000_000, 3, 0)],
        warnings=list(warnings),
        errors=errors or {},
    )


def test_usage_over_the_threshold_fails_with_the_warning() -> None:
    """A usage warning (a target over its threshold) or a target not measured fails."""
    assert check_usage(_usage()).status == "ok"
    assert "2.4 GB in total" in check_usage(_usage()).detail
    assert check_usage(_usage("file:///backups holds 2.4 GB, over 2 GB")).status == "failed"
    assert check_usage(_usage(errors={S3: "timeout"})).status == "failed"


def test_the_report_lists_every_check_and_fails_with_one_line_naming_the_failures() -> None:
    """evaluate runs every check; a failing report raises one line naming each failure."""
    stale = backup(timedelta(days=3), tests=[(timedelta(days=2), True)])

    report = evaluate(held(stale, offsite={S3: [stale.id]}), _usage(), DAILY, NOW, "app on db")

    assert [c.name for c in report.checks] == [
        "freshness", "verified", "size", "restore-test", "offsite",
        "usage", "quota", "disk", "storage", "scheduler",
    ]  # fmt: skip
    assert not report.ok and [c.name for c in report.failed] == ["freshness"]
    assert [r["status"] for r in report.as_table()] == [
        "failed", "ok", "ok", "ok", "ok", "ok", "skipped", "skipped", "ok", "skipped",
    ]  # fmt: skip
    with pytest.raises(PgkeeperError) as info:
        raise_for_failure(report)
    assert str(info.value).startswith("app on db: 1 of 10 checks failed: freshness: ")
    assert "\n" not in str(info.value)


def test_a_healthy_report_does_not_raise() -> None:
    """All checks ok: the report is ok and raise_for_failure returns."""
    fresh = backup(timedelta(hours=2), tests=[(timedelta(hours=1), True)])

    report = evaluate(held(fresh, offsite={S3: [fresh.id]}), _usage(), DAILY, NOW)

    assert report.ok and report.summary() == "pgkeeper: all 10 checks passed"
    raise_for_failure(report)
