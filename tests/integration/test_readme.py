"""The manual's examples (README.md and docs/), run as written: a manual that lies is worse
than none.

Code blocks are taken from the files by section, so an edit to an example is what gets tested.
The only substitutions are the ones a reader makes: their own database URL and backup folder
for the quick start's placeholders, and the API's real port for `127.0.0.1:8080`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.settings import load_settings
from pgkeeper.verify import verify_backup
from tests.servers.postgres import PgCluster
from tests.support.api import ADMIN, live_api_server
from tests.support.cli import PGKEEPER, cli_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def section(heading: str, path: Path = README) -> str:
    """The text of the section that starts with ``heading`` (a whole heading line), up to the
    next heading of the same or a higher level."""
    text = path.read_text()
    match = re.search(rf"^{re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"no section {heading!r} in {path.name}"
    level = len(heading) - len(heading.lstrip("#"))
    rest = text[match.end():]
    fenced = False
    offset = 0
    for line in rest.splitlines(keepends=True):  # a '#' comment in a code block is no heading
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return rest[:offset]
        offset += len(line)
    return rest


API_REFERENCE = section("# HTTP API", DOCS / "api.md")


def code_blocks(text: str, languages: tuple[str, ...] = ("sh",)) -> list[str]:
    return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.DOTALL)
            if m.group(1) in languages]  # fmt: skip


def bash(
    script: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def reader_env(url: str, backups: Path, cluster: PgCluster) -> dict[str, str]:
    """A reader's shell: pgkeeper's settings, and the cluster's client tools first on PATH."""
    env = cli_env(url, backups)
    env["PATH"] = f"{cluster.bindir}:{PGKEEPER.parent}:{env.get('PATH', '')}"
    return env


def test_quick_start_first_backup_works_as_written(
    sample_db: str, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """Quick start: the 'first backup of your own database' block, with the reader's own URL
    and folder in place of the example exports: backup, list, restore latest."""
    block = next(b for b in code_blocks(section("## Quick start")) if "restore latest" in b)
    lines = [line for line in block.splitlines()
             if not line.startswith(("export DATABASE_URL=", "export BACKUP_DIR="))]  # fmt: skip
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    proc = bash("set -e\n" + "\n".join(lines), reader_env(sample_db, tmp_path / "b", pg_cluster),
                tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    restored = re.search(r"restored \S+ into postgresql://\S+/(\S+) in", proc.stdout)
    assert restored, proc.stdout
    pg_cluster.drop_database(restored.group(1))


def _dry_run_examples() -> list[tuple[dict[str, str], list[str]]]:
    """(settings, the example's first output lines) of every `rotate --dry-run` example."""
    examples = []
    for block in code_blocks(section("# Retention and rotation", DOCS / "retention.md"), ("",)):
        command, _, output = block.partition("pgkeeper rotate --dry-run\n")
        if not command.startswith("$ "):
            continue
        settings = dict(re.findall(r"(BACKUP_\w+)=(\S+)", command))
        examples.append((settings, output.splitlines()[:3]))
    assert len(examples) >= 5
    return examples


def test_rotation_dry_run_examples_match_the_tool(sample_db: str, tmp_path: Path) -> None:
    """Each README dry-run example's target line, policy line and columns are what
    `pgkeeper rotate --dry-run` prints with that example's settings."""
    backups = tmp_path / "backups"
    settings = load_settings(_env_file=None, database_url=sample_db, backup_dir=str(backups))
    verify_backup(settings, run_backup(settings, BackupOptions()).id)
    for example_settings, shown in _dry_run_examples():
        env = cli_env(sample_db, backups, **example_settings)
        proc = subprocess.run([str(PGKEEPER), "rotate", "--dry-run"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        printed = proc.stdout.splitlines()
        assert printed[0] == f"target: {backups}" and shown[0] == "target: /var/backups/pgkeeper"
        assert printed[1] == shown[1], example_settings
        assert printed[2].split() == shown[2].split() == [
            "backup", "state", "size", "action", "reasons",
        ]


def _one_line(command: str) -> str:
    return " ".join(command.replace("\\\n", " ").split())


def test_the_front_pages_endpoint_examples_are_the_reference_examples() -> None:
    """Each curl of the README's endpoint table is, word for word, an example of docs/api.md,
    which the next tests run; and the table has one row per endpoint of the reference."""
    table = section("## HTTP API endpoints")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    run = {_one_line(line) for block in code_blocks(API_REFERENCE) for line in
           re.split(r"\n(?=curl )", block.replace("\\\n", " "))}  # fmt: skip
    endpoints = set(re.findall(r"^## `([A-Z]+ [^`]+)`", API_REFERENCE, re.MULTILINE))
    assert {row.split("`")[1] for row in rows} == endpoints
    for row in rows:
        example = row.rsplit("|", 2)[1].strip()
        assert example.startswith("`curl ") and example.endswith("`"), row
        assert _one_line(example[1:-1]) in run, example


def test_http_api_examples_work_as_written(
    sample_db: str, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """Every shell example of the HTTP API section, in order, against a live `pgkeeper api`:
    each JSON answer says success, the downloads land, the import works; the "wait": false
    one-liner without a Prefect server stops with the API's one-line error, no traceback."""
    backups = tmp_path / "backups"
    # The schedule examples need a Prefect server with deployments: the next test runs them.
    blocks = [b for b in code_blocks(API_REFERENCE) if "/api/schedule" not in b]
    copy = f"shop_copy_{uuid.uuid4().hex[:6]}"
    with live_api_server(tmp_path, backups, DATABASE_URL=sample_db) as server:
        env = reader_env(sample_db, backups, pg_cluster) | {
            "BACKUP_API_TOKEN": ADMIN, "DATABASE_URL": sample_db,
        }  # fmt: skip
        script = []
        for index, block in enumerate(blocks):
            block = block.replace("http://127.0.0.1:8080", server.url).replace("shop_copy", copy)
            script.append(f"echo '@@block {index}'\n{block}\necho\necho '@@rc {index}' $?")
        work = tmp_path / "work"
        work.mkdir()
        proc = bash("\n".join(script), env, work)
    pg_cluster.drop_database(copy)
    outputs = re.split(r"^@@block \d+$", proc.stdout, flags=re.MULTILINE)[1:]
    assert len(outputs) == len(blocks), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for block, out in zip(blocks, outputs, strict=True):
        body, rc = out.rsplit("@@rc", 1)
        body = body.strip()
        if '"wait": false' in block:  # needs a Prefect server, which this test does not start
            assert body == "" and "error: no Prefect server is configured" in proc.stderr
            continue
        if "/api/runs/" in block:
            continue  # the run of the example above, which was not started
        assert rc.split()[-1] == "0", (block, body, proc.stderr)
        if block.lstrip().startswith("curl -s ") or "\ncurl -s " in block:
            answer = json.loads(body.splitlines()[-1] if "\n" in body else body)
            assert answer["success"] is True, (block, answer)
    assert any(p.name.endswith(".dump.zst") for p in work.iterdir())  # curl -OJ
    assert (work / "first-kib.bin").stat().st_size == 1024
    assert shutil.which("pg_dump", path=env["PATH"]) is not None
    assert "from_prod_" in outputs[-1]
    assert os.environ.get("BACKUP_API_TOKEN") is None  # the test did not leak its token


def test_http_api_schedule_examples_work_as_written(
    prefect_server_process: str, tmp_path: Path
) -> None:
    """The HTTP API section's schedule examples (after its setup block), against a live
    `pgkeeper api` whose Prefect server has serve's deployments: each answers success, and the
    PUT example's schedules are what the server then has."""
    from pgkeeper.prefect_api import PrefectLink
    from tests.support.schedules import clear_pgkeeper, register_all

    blocks = code_blocks(API_REFERENCE)
    setup = next(b for b in blocks if b.startswith("API="))
    examples = [b for b in blocks if "/api/schedule" in b]
    assert [("-X PUT" in b) for b in examples] == [False, True]
    link = PrefectLink(api_url=prefect_server_process, ui_url=None, timeout=30)
    clear_pgkeeper(link)
    register_all(link, load_settings(_env_file=None))
    try:
        with live_api_server(tmp_path, tmp_path / "backups",
                             PREFECT_API_URL=prefect_server_process) as server:  # fmt: skip
            env = cli_env(None, tmp_path / "backups", BACKUP_API_TOKEN=ADMIN)
            for block in examples:
                script = (setup + block).replace("http://127.0.0.1:8080", server.url)
                proc = bash(script, env, tmp_path)
                assert proc.returncode == 0, proc.stderr
                assert json.loads(proc.stdout)["success"] is True, proc.stdout
        active = {
            d["name"] for d in link.deployments_of("backup")
            if any(s["active"] for s in d["schedules"])
        }  # fmt: skip
        assert active == {"backup-hourly", "backup-weekly"}
    finally:
        clear_pgkeeper(link)


def test_checking_a_backup_by_hand_works_as_written(sample_db: str, tmp_path: Path) -> None:
    """'Restoring by hand': the sha256sum recipe, run inside a directory backup's folder, says
    OK for every file, and FAILED for a file changed afterwards."""
    by_hand = section("## Restoring by hand, without pgkeeper", DOCS / "disaster-recovery.md")
    block = next(b for b in code_blocks(by_hand)
                 if "sha256sum -c" in b)  # fmt: skip
    backups = tmp_path / "backups"
    settings = load_settings(_env_file=None, database_url=sample_db, backup_dir=str(backups),
                             backup_format="directory")  # fmt: skip
    made = run_backup(settings, BackupOptions())
    script = block.replace("/var/backups/pgkeeper/ID", str(backups / made.id))
    ok = bash(script, dict(os.environ), tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": OK") == len(made.objects) > 2
    victim = backups / made.id / made.objects[-1].name
    victim.write_bytes(victim.read_bytes() + b"x")
    bad = bash(script, dict(os.environ), tmp_path)
    assert bad.returncode != 0 and "FAILED" in bad.stdout


def test_the_fleet_inventory_example_is_a_valid_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'Many databases': the inventory file example loads as written (its password file and
    variable given), with the overrides it shows."""
    from pgkeeper.inventory import load_inventory

    block = code_blocks(section("# Many databases: the fleet", DOCS / "fleet.md"), ("yaml",))[0]
    secret = tmp_path / "db1"
    secret.write_text("pw1\n")
    path = tmp_path / "inventory.yaml"
    path.write_text(block.replace("/run/secrets/db1", str(secret)))
    monkeypatch.setenv("DB2_PASSWORD", "pw2")
    inventory = load_inventory(
        load_settings(_env_file=None, backup_inventory=str(path)), expand=False
    )
    by_name = {d.name: d for d in inventory.databases}
    assert by_name["shop"].settings.backup_keep_hourly == 48
    assert by_name["shop"].settings.backup_schedule == "hourly"
    assert by_name["shop"].settings.backup_keep_daily == 7
    assert not by_name["app_legacy"].enabled
    assert by_name["app"].server == "db2.internal:5432" and "pw2" in by_name["app"].url
    assert {s.server for s in inventory.servers} == {"db1.internal:5432", "db2.internal:5432"}


@pytest.mark.skipif(shutil.which("age") is None, reason="age is not installed")
@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_restoring_an_encrypted_backup_by_hand_works_as_written(
    fmt: str, sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """'Restoring an encrypted backup by hand': Debian's age, zstd and pg_restore restore what
    pgkeeper encrypted (the reader's folder, id and key put in for the placeholders)."""
    by_hand = section("## Restoring an encrypted backup by hand", DOCS / "encryption.md")
    blocks = code_blocks(by_hand)
    block = blocks[0] if fmt == "custom" else blocks[1]
    key = tmp_path / "restore-key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    backups = tmp_path / "backups"
    settings = load_settings(
        _env_file=None, database_url=sample_db, backup_dir=str(backups),
        backup_format=fmt, backup_compression="zstd" if fmt == "custom" else "gzip",
        backup_encryption_recipients=public,
    )  # fmt: skip
    made = run_backup(settings, BackupOptions())
    target = f"app_new_{uuid.uuid4().hex[:6]}"
    script = (
        block.replace("/var/backups/pgkeeper/ID", str(backups / made.id))
        .replace("/etc/pgkeeper/restore-key.txt", str(key))
        .replace("/tmp/ID.dir", str(tmp_path / "plain.dir"))
        .replace("app_new", target)
    )
    script = re.sub(r"\bID\b", made.id, script)
    env = reader_env(sample_db, backups, pg_cluster)
    env.update(pg_cluster.libpq_env("postgres"))
    try:
        done = bash("set -e\n" + script, env, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = pg_cluster.query("SELECT count(*) FROM shop.orders", dbname=target)
        assert rows == [(1200,)]
    finally:
        pg_cluster.drop_database(target)
    assert not (tmp_path / "plain.dir").exists()  # the decrypted files were removed
