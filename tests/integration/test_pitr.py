"""Point-in-time recovery on real clusters: continuous archiving with `pgkeeper wal-push`, base
backups, restores to a moment, to the end of the archive and along timelines, and what the
archive refuses (a gap, other bytes under an archived name, a half-written push).

One archiving cluster serves the module (tests run in file order and build on each other's
commits); the timeline test comes last because its restored cluster archives a second
timeline into the same archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from pgkeeper import naming, wal
from pgkeeper.storage import LocalStorage
from tests.servers import free_port
from tests.support.cli import PGKEEPER, one_line_error
from tests.support.pitr import (
    AS_ROOT,
    Archiving,
    archiving_cluster,
    restored,
    rows,
    segment_bytes,
    shared_dir,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def arch(server_pgkeeper: Path) -> Iterator[Archiving]:
    with archiving_cluster(server_pgkeeper) as archiving:
        archiving.cluster.execute("CREATE TABLE pitr_rows (v int PRIMARY KEY)")
        yield archiving


@pytest.fixture(scope="module")
def history(arch: Archiving) -> dict[str, object]:
    """Commits 1-2, a base backup, commits 3-5 at known times, all archived."""
    arch.commit(1)
    arch.commit(2)
    made = arch.cli("base-backup", "--json")
    assert made.returncode == 0, made.stderr
    times = {}
    for value in (3, 4, 5):
        times[value] = arch.commit(value)
        time.sleep(0.4)
    arch.switch_and_wait()
    return {"base": json.loads(made.stdout), "times": times}


def system_id(arch: Archiving) -> int:
    return int(arch.cluster.query("SELECT system_identifier FROM pg_control_system()")[0][0])


def test_base_backup_is_listed_as_kind_base(arch: Archiving, history: dict[str, object]) -> None:
    """A base backup is listed beside the dumps as kind base, verified, with its WAL range."""
    listed = arch.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)["backups"]
    assert entry["kind"] == "base" and entry["database"] == "*"
    assert entry["format"] == "tar" and entry["compression"] == "zstd"
    assert entry["state"] == "verified"
    base = entry["base"]
    assert base["timeline"] == 1 and base["system_identifier"] == system_id(arch)
    assert wal.parse_lsn(base["start_lsn"]) < wal.parse_lsn(base["stop_lsn"])
    checks = {c["name"]: c for c in entry["verification"]["checks"]}
    assert checks["backup_manifest"]["ok"] and checks["wal"]["ok"]


def test_restore_to_a_time_between_two_commits(
    arch: Archiving, history: dict[str, object], tmp_path: Path
) -> None:
    """--time between commit 4 and commit 5 brings back exactly rows 1-4, on a started server."""
    times = history["times"]
    assert isinstance(times, dict)
    between = times[4] + (times[5] - times[4]) / 2
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli(
            "pitr", "restore", "--time", between.isoformat(), "--to", str(folder),
            "--start", "--port", str(port),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2, 3, 4]
        conf = (folder / "postgresql.auto.conf").read_text()
        assert "archive_mode = off" in conf and "recovery_target_time" in conf


def test_latest_restores_everything_archived(
    arch: Archiving, history: dict[str, object]
) -> None:
    """--latest replays every archived segment: all five rows."""
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder), "--start",
                        "--port", str(port))  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2, 3, 4, 5]


def test_restore_without_start_prints_how_to_start(
    arch: Archiving, history: dict[str, object]
) -> None:
    """Without --start the folder is ready (recovery.signal, restore_command) and the output
    says how to start it; a non-empty folder is refused before anything is written."""
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder))
        assert done.returncode == 0, done.stderr
        assert "start it with:" in done.stdout
        assert (folder / "recovery.signal").exists()
        assert "wal-fetch" in (folder / "postgresql.auto.conf").read_text()
        again = arch.cli("pitr", "restore", "--latest", "--to", str(folder))
        assert "is not empty" in one_line_error(again, 2)


def test_targets_outside_the_window_name_the_window(
    arch: Archiving, history: dict[str, object]
) -> None:
    """A time before the base backup ended, or after the last archived commit, is a one-line
    error that says which times are reachable; nothing is created."""
    base = history["base"]
    assert isinstance(base, dict)
    before = base["base"]["stopped_at"].replace("Z", "+00:00")
    from datetime import datetime

    too_early = (datetime.fromisoformat(before) - timedelta(minutes=5)).isoformat()
    folder = shared_dir("pgkeeper-restore-") / "data"
    early = arch.cli("pitr", "restore", "--time", too_early, "--to", str(folder))
    assert "reachable:" in one_line_error(early, 2)
    too_late = (datetime.now().astimezone() + timedelta(hours=1)).isoformat()
    late = arch.cli("pitr", "restore", "--time", too_late, "--to", str(folder))
    message = one_line_error(late, 2)
    assert "past the end of the archive" in message and "reachable:" in message
    assert not folder.exists()


def test_status_shows_the_window_and_no_gap(arch: Archiving, history: dict[str, object]) -> None:
    """pitr status: one timeline, recoverable from the base backup's end, no gap, no lag."""
    done = arch.cli("pitr", "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (timeline,) = report["timelines"]
    assert timeline["timeline"] == 1 and timeline["gaps"] == []
    assert timeline["recoverable_from"] is not None and timeline["base_backups"] == 1
    assert report["server"]["failed_count"] == 0
    assert report["lag_segments"] == 0


def _copy_archive(arch: Archiving) -> Path:
    copy = shared_dir("pgkeeper-archive-copy-") / "backups"
    shutil.copytree(arch.backups, copy)
    if AS_ROOT:
        subprocess.run(["chown", "-R", "postgres:postgres", str(copy)], check=True)
    return copy


def test_a_missing_segment_stops_restore_naming_it(
    arch: Archiving, history: dict[str, object]
) -> None:
    """With a segment deleted from the middle of the archive, --latest stops before doing
    anything with an error naming that segment, and wal-fetch of it exits 126 (PostgreSQL
    then aborts recovery rather than promoting early)."""
    arch.commit(6)
    arch.switch_and_wait()
    arch.commit(7)
    arch.switch_and_wait()
    copy = _copy_archive(arch)
    try:
        archive = wal.list_archive(LocalStorage(copy), system_id(arch))
        names = archive.segments(1)
        victim = names[-2]
        for item in archive.files[victim]:
            (copy / item.key).unlink()
        folder = shared_dir("pgkeeper-restore-") / "data"
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder), BACKUP_DIR=str(copy))
        message = one_line_error(done, 1)
        assert victim in message and "missing" in message
        assert not folder.exists()
        sid = str(system_id(arch))
        fetched = arch.cli("wal-fetch", "--system-id", sid, victim, str(folder.parent / victim),
                           BACKUP_DIR=str(copy))  # fmt: skip
        assert fetched.returncode == 126, fetched.stderr
        assert victim in fetched.stderr and "gap" in fetched.stderr
        past = wal.segment_name(1, wal.segment_number(names[-1]) + 5)
        beyond = arch.cli("wal-fetch", "--system-id", sid, past, str(folder.parent / "x"),
                          BACKUP_DIR=str(copy))  # fmt: skip
        assert (beyond.returncode, beyond.stderr) == (1, "")  # the end of the archive: quiet
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def _fetch_segment(arch: Archiving, name: str, dest: Path) -> bytes:
    done = arch.cli("wal-fetch", "--system-id", str(system_id(arch)), name, str(dest))
    assert done.returncode == 0, done.stderr
    return dest.read_bytes()


def _stored(arch: Archiving, name: str) -> dict[str, str]:
    return wal.archived_copies(LocalStorage(arch.backups), system_id(arch), name)


def test_same_segment_twice_succeeds_other_bytes_are_refused(
    arch: Archiving, history: dict[str, object]
) -> None:
    """Pushing an archived segment again with the same bytes exits 0; the same name with one
    byte changed exits non-zero, names the file, and the archive keeps the original only."""
    sid = system_id(arch)
    name = arch.switch_and_wait()
    folder = shared_dir("pgkeeper-push-")
    try:
        original = _fetch_segment(arch, name, folder / name)
        before = _stored(arch, name)
        again = arch.cli("wal-push", "--system-id", str(sid), str(folder / name))
        assert again.returncode == 0, again.stderr
        changed = bytearray(original)
        changed[9000] ^= 0xFF
        (folder / name).write_bytes(bytes(changed))
        refused = arch.cli("wal-push", "--system-id", str(sid), str(folder / name))
        message = one_line_error(refused, 1)
        assert name in message and "other contents" in message
        assert _stored(arch, name) == before
        assert _fetch_segment(arch, name, folder / "check") == original
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_killed_wal_push_leaves_nothing_wal_fetch_hands_out(
    arch: Archiving, history: dict[str, object]
) -> None:
    """wal-push SIGKILLed at many points of archiving an incompressible 16 MiB segment: each
    time, wal-fetch of that name either hands out exactly those bytes or says it has none."""
    sid = system_id(arch)
    folder = shared_dir("pgkeeper-kill-")
    try:
        for attempt, delay in enumerate([0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3, 0.5]):
            segno = 0x7F000 + attempt  # far beyond the cluster's own WAL
            name = wal.segment_name(1, segno)
            data = segment_bytes(sid, 1, segno, os.urandom(16 * 1024 * 1024 - 4096))
            (folder / name).write_bytes(data)
            proc = subprocess.Popen(
                [str(PGKEEPER), "--env-file", str(arch.env_file), "wal-push", str(folder / name)],
                env=arch.env, cwd=arch.root,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            out = folder / f"{name}.fetched"
            fetched = arch.cli("wal-fetch", "--system-id", str(sid), name, str(out))
            assert fetched.returncode in (0, 1), fetched.stderr
            if fetched.returncode == 0:
                assert out.read_bytes() == data
            else:
                assert not out.exists()
            for sha, key in _stored(arch, name).items():  # tidy: not part of the cluster's WAL
                assert sha == hashlib.sha256(data).hexdigest()
                (Path(arch.backups) / key).unlink()
            (folder / name).unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_timeline_switch_keeps_both_timelines_restorable(
    arch: Archiving, history: dict[str, object]
) -> None:
    """A restored cluster promoted with --archive archives timeline 2 into the same archive;
    the original goes on writing timeline 1. --latest follows timeline 2; --timeline 1 gets
    the original's later commits."""
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--archive", "--to", str(folder),
                        "--start", "--port", str(port))  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        url = f"postgresql://postgres:{arch.cluster.password}@127.0.0.1:{port}/postgres"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO pitr_rows (v) VALUES (200)")
            tli = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
            name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            assert tli is not None and tli[0] == 2 and name is not None
            deadline = time.monotonic() + 60
            while (last_archived(conn) or "") < name[0]:
                assert time.monotonic() < deadline, "timeline 2 was not archived"
                time.sleep(0.05)
    arch.commit(100)
    arch.switch_and_wait()
    expected_tl1 = sorted({*rows_now(arch), 100})
    for flags, expected in ((["--latest"], "tl2"), (["--latest", "--timeline", "1"], "tl1")):
        port = free_port("127.0.0.1")
        folder = shared_dir("pgkeeper-restore-") / "data"
        with restored(folder):
            done = arch.cli("pitr", "restore", *flags, "--to", str(folder), "--start",
                            "--port", str(port))  # fmt: skip
            assert done.returncode == 0, done.stderr + done.stdout
            got = rows(arch.cluster, port)
            if expected == "tl2":
                assert 200 in got and 100 not in got
            else:
                assert got == expected_tl1 and 200 not in got
    status = json.loads(arch.cli("pitr", "status", "--json").stdout)
    assert {t["timeline"] for t in status["timelines"]} == {1, 2}
    assert naming.wal_timeline("00000002.history") == "00000002"


def rows_now(arch: Archiving) -> list[int]:
    return [int(r[0]) for r in arch.cluster.query("SELECT v FROM pitr_rows ORDER BY v")]


def last_archived(conn: psycopg.Connection[tuple[object, ...]]) -> str | None:
    row = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
    return str(row[0])[:24] if row and row[0] else None
