"""`pgkeeper import --from-dir`: a folder of the seed's backups
(`<name>_<YYYY-MM-DDTHH-MM-SS>.sql.gz`, plain SQL, gzip) comes in with each file's own name and
time; bad files are reported with the reason and never listed; a re-run imports nothing twice,
even what rotation deleted since; and retention sees their real ages."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from tests.servers.postgres import PgCluster
from tests.support.cli import cli_env, run_cli

pytestmark = pytest.mark.integration

GOOD = {  # file -> the id it becomes; deliberately not in time order by file name
    "shop_2025-10-02T02-00-00.sql.gz": "shop_2025-10-02T02-00-00Z",
    "auto_backup_2025-10-01T02-00-00.sql.gz": "auto_backup_2025-10-01T02-00-00Z",
    "shop_2025-10-03T02-00-00-250Z.sql.gz": "shop_2025-10-03T02-00-00.250Z",
}
CORRUPT = "shop_2025-10-04T02-00-00.sql.gz"
NOT_A_DUMP = "shop_2025-10-05T02-00-00.sql.gz"
META_COMMAND = "shop_2025-10-06T02-00-00.sql.gz"
NO_DATE = "shop_2025-13-40T02-00-00.sql.gz"
ODD = ["notes.txt", "backup.sql.gz"]


def seed_folder(folder: Path, url: str, cluster: PgCluster) -> Path:
    """What the seed's service leaves: `pg_dump` plain SQL, gzip, one file per backup, a row
    added between backups; plus a truncated one, a gzip of text, a dump running a shell
    command, a time that is no date, and two files that are no backups at all."""
    folder.mkdir()
    dbname = url.rsplit("/", 1)[1].split("?")[0]
    for index, name in enumerate(sorted(GOOD, key=GOOD.__getitem__)):
        cluster.execute("INSERT INTO public.audit_log (note) VALUES (%s)", [name], dbname=dbname)
        dump = subprocess.run([str(cluster.bindir / "pg_dump"), "--format=plain", url],
                              capture_output=True, check=True).stdout  # fmt: skip
        (folder / name).write_bytes(gzip.compress(dump, mtime=index))
    good = (folder / next(iter(GOOD))).read_bytes()
    (folder / CORRUPT).write_bytes(good[: len(good) // 2])
    (folder / NOT_A_DUMP).write_bytes(gzip.compress(b"hello, this is not SQL\n" * 50))
    dump = gzip.decompress(good)
    end = dump.index(b"\n--\n-- PostgreSQL database dump complete")
    hostile = dump[:end] + b"\n\\! touch /tmp/pwned\n" + dump[end:]
    (folder / META_COMMAND).write_bytes(gzip.compress(hostile))
    (folder / NO_DATE).write_bytes(good)
    (folder / "notes.txt").write_text("the old backups\n")
    (folder / "backup.sql.gz").write_bytes(good)
    return folder


def import_dir(folder: Path, env: dict[str, str], cwd: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    proc = run_cli("import", "--from-dir", str(folder), "--json", *extra, env=env, cwd=cwd)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)  # the bad files fail the run
    assert proc.stderr.startswith("error: 4 of the files named like backups could not be")
    report: dict = json.loads(proc.stdout)  # type: ignore[type-arg]
    return report


def by_file(report: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {f["file"]: f for f in report["files"]}


def test_a_seed_folder_is_imported_with_real_names_and_times_and_bad_files_are_reported(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """Three good files become verified backups named and timed by their file names (the
    listing says so), database 'shop' as told; the corrupt, not-a-dump, meta-command and
    no-date files fail with their reason and leave nothing; two odd names are skipped."""
    folder = seed_folder(tmp_path / "seed", sample_db, pg_cluster)
    backups = tmp_path / "backups"
    env = cli_env(None, backups)
    report = import_dir(folder, env, tmp_path, "--database", "shop")
    files = by_file(report)

    assert (report["imported"], report["failed"], report["skipped"]) == (3, 4, 2)
    assert [f["file"] for f in report["files"][:3]] == sorted(GOOD, key=GOOD.__getitem__)
    for name, backup_id in GOOD.items():
        assert files[name]["status"] == "imported" and files[name]["id"] == backup_id
    assert "not a usable PostgreSQL dump" in files[CORRUPT]["reason"]
    assert "not a PostgreSQL dump" in files[NOT_A_DUMP]["reason"]
    assert "psql" in files[META_COMMAND]["reason"] or "meta" in files[META_COMMAND]["reason"]
    assert files[NO_DATE]["reason"] == "its time 2025-13-40T02-00-00 is not a date"
    for name in ODD:
        assert files[name]["status"] == "skipped" and "not named like a seed backup" in (
            files[name]["reason"])  # fmt: skip

    listed = json.loads(run_cli("list", "--json", env=env, cwd=tmp_path).stdout)["backups"]
    assert {b["id"] for b in listed} == set(GOOD.values())
    for backup in listed:
        stamp = backup["id"].split("_")[-1].replace("Z", "")
        day, clock = stamp.split("T")
        expected = f"{day}T{clock[:8].replace('-', ':')}{clock[8:]}"
        assert backup["started_at"].replace("+00:00", "").startswith(expected)
        assert backup["finished_at"] == backup["started_at"]
        assert (backup["state"], backup["trigger"], backup["database"]) == (
            "verified", "import", "shop")  # fmt: skip
        assert backup["options"]["imported_from"] in GOOD
    folders = {p.name for p in backups.iterdir()}
    assert folders == {*GOOD.values(), "imports"}  # nothing left of the failed files


def test_a_rerun_imports_nothing_twice_even_what_rotation_deleted(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """The second run imports nothing (each good file 'already imported as ID'); a backup
    deleted since (rotation, or by hand) is not brought back by a third run; a new file in
    the folder is imported by it."""
    folder = seed_folder(tmp_path / "seed", sample_db, pg_cluster)
    env = cli_env(None, tmp_path / "backups")
    import_dir(folder, env, tmp_path)
    again = import_dir(folder, env, tmp_path)
    assert again["imported"] == 0 and again["alreadyImported"] == 3
    assert by_file(again)["shop_2025-10-02T02-00-00.sql.gz"]["reason"] == (
        "already imported as shop_2025-10-02T02-00-00Z")  # fmt: skip

    deleted = run_cli("delete", "shop_2025-10-02T02-00-00Z", env=env, cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    newest = folder / "shop_2025-10-07T02-00-00.sql.gz"
    newest.write_bytes((folder / "shop_2025-10-02T02-00-00.sql.gz").read_bytes())
    third = by_file(import_dir(folder, env, tmp_path))
    gone = third["shop_2025-10-02T02-00-00.sql.gz"]
    assert gone["status"] == "already imported" and "deleted since" in gone["reason"]
    assert third[newest.name]["status"] == "imported"
    listed = json.loads(run_cli("list", "--json", env=env, cwd=tmp_path).stdout)["backups"]
    assert "shop_2025-10-02T02-00-00Z" not in {b["id"] for b in listed}


def test_retention_orders_imported_backups_by_their_file_name_times(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """Imported in two runs, newest files first: `rotate --dry-run` lists them by the times in
    their file names, newest first, and with BACKUP_MAX_BACKUPS=2 would delete the oldest."""
    folder = seed_folder(tmp_path / "seed", sample_db, pg_cluster)
    env = cli_env(None, tmp_path / "backups")
    later = tmp_path / "later"
    later.mkdir()
    oldest = "auto_backup_2025-10-01T02-00-00.sql.gz"
    (folder / oldest).rename(later / oldest)  # the oldest file is imported last
    import_dir(folder, env, tmp_path, "--database", "shop")
    second = run_cli("import", "--from-dir", str(later), "--database", "shop", env=env,
                     cwd=tmp_path)  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1].startswith("1 imported, 0 already imported")

    plan = run_cli("rotate", "--dry-run", env=env | {"BACKUP_MAX_BACKUPS": "2"}, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    rows = [line.split() for line in plan.stdout.splitlines() if "_2025-10-0" in line]
    by_time = sorted(GOOD.values(), key=lambda i: i.rsplit("_", 1)[1], reverse=True)
    assert [row[0] for row in rows] == by_time
    actions = {row[0]: " ".join(row[3:]) for row in rows}
    assert "would delete" in actions["auto_backup_2025-10-01T02-00-00Z"]
    assert "would delete" not in actions["shop_2025-10-03T02-00-00.250Z"]


def test_import_from_dir_refuses_a_file_and_a_folder_at_once_and_a_missing_folder(
    tmp_path: Path,
) -> None:
    """A FILE with --from-dir, no argument at all, or a folder that is not there: usage
    errors in one line (exit 2)."""
    env = cli_env(None, tmp_path / "backups")
    both = run_cli("import", "x.dump", "--from-dir", str(tmp_path), env=env, cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr
    none = run_cli("import", env=env, cwd=tmp_path)
    assert none.returncode == 2 and "--from-dir" in none.stderr
    missing = run_cli("import", "--from-dir", str(tmp_path / "nope"), env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_with_encryption_the_import_is_encrypted_and_a_rerun_still_imports_nothing_twice(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """BACKUP_ENCRYPTION_RECIPIENTS set: the stored bytes are age files (so not the file's
    sha256), yet a re-run knows each file by the sha256 recorded at import, and one deleted
    since is not brought back."""
    identity = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    folder = seed_folder(tmp_path / "seed", sample_db, pg_cluster)
    backups = tmp_path / "backups"
    env = cli_env(None, backups, BACKUP_ENCRYPTION_RECIPIENTS=recipient,
                  BACKUP_ENCRYPTION_IDENTITY_FILE=str(identity))  # fmt: skip
    first = import_dir(folder, env, tmp_path)
    assert first["imported"] == 3
    stored = backups / "shop_2025-10-02T02-00-00Z"
    data = [p for p in stored.iterdir() if p.name.endswith(".age")]
    assert data and data[0].read_bytes().startswith(b"age-encryption.org/v1\n")

    again = import_dir(folder, env, tmp_path)
    assert (again["imported"], again["alreadyImported"]) == (0, 3)
    assert run_cli("delete", "shop_2025-10-02T02-00-00Z", env=env, cwd=tmp_path).returncode == 0
    third = by_file(import_dir(folder, env, tmp_path))
    assert "deleted since" in third["shop_2025-10-02T02-00-00.sql.gz"]["reason"]
