"""Benchmark point-in-time recovery: WAL archiving under a write load, and PITR restore time,
each against its baseline measured in the same run.

Archiving (`--rounds` fresh clusters per case, round-robin; medians reported). The load is
`pgbench -i -s SCALE` (default 30: ~380 MB of WAL in a few seconds, faster than one 16 MiB
segment per 0.1 s), with archive_command =
  cp                 `test ! -f DIR/%f && cp %p DIR/%f` (the classic recipe; no compression)
  pgbackrest-async   pgBackRest 2.45 `archive-push` with archive-async=y, process-max=2, zst
  pgkeeper           `pgkeeper --env-file F wal-push %p` (defaults: the background pusher)
  pgkeeper-age       the same with BACKUP_ENCRYPTION_RECIPIENTS (the pusher encrypts, age)
  pgkeeper-sync      the same with BACKUP_WAL_ASYNC=false (one process archives each file)
For each: segments written, archived when the load ended, waiting then (lag), seconds until
none waits, segments/s over load + catch-up, and the CPU seconds archiving cost (the
archiver's own and reaped children's, plus detached helpers: pgkeeper's pusher,
pgBackRest's async process). The load is faster than some archivers but not all, so
segments/s there is mostly the load's; the **drain** runs measure each archiver's capacity:
the same load with archive_command unset (the WAL piles up), then the command is set and the
backlog is timed until archived.

Restore (`--rounds` times): one cluster archives both ways at once (`cp` to a folder, then
`pgkeeper wal-push`); a plain `pg_basebackup` and a `pgkeeper base-backup` are taken back to
back, then the same load runs and is archived. Timed until the restored server has replayed
everything and promoted:
  pg_basebackup+cp   copy the plain base backup, restore_command = 'cp DIR/%f %p', start
  pgkeeper           `pgkeeper pitr restore --latest --to DIR --start --port P`
  pgkeeper-age       the same from a second cluster whose base backup and WAL are encrypted
                     (the identity decrypts them; only when pgkeeper-age is among --cases)

    make bench-pitr PITR_BENCH_ARGS="--scale 30 --rounds 3"
    .venv/bin/python bench/bench_pitr.py --scale 10 --rounds 1        # a quick look

Runs as root (the servers run as the `postgres` user) with pgBackRest installed
(`PGKEEPER_BENCH_PITR=1 scripts/system-deps.sh`, which make bench-pitr runs). Results go to
`.bench/pitr-results.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import free_port  # noqa: E402 - needs the sys.path line above
from tests.servers.postgres import PgCluster, pg_bindir, stop_data_dir  # noqa: E402
from tests.support.pitr import build_server_venv, make_env_file, shared_dir  # noqa: E402

PGKEEPER = Path(sys.executable).with_name("pgkeeper")
BENCH = ROOT / ".bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AS_ROOT = os.geteuid() == 0
CASES = ("cp", "pgbackrest-async", "pgkeeper", "pgkeeper-age", "pgkeeper-sync")


def server_pgkeeper() -> Path:
    """The server-side venv (the postgres user runs it), rebuilt when the sources changed."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "src").rglob("*.py"), ROOT / "pyproject.toml"]):
        digest.update(path.read_bytes())
    folder = BENCH / "server-venv"  # inside the checkout: readable by the server's user
    stamp = folder / "stamp"
    if not (stamp.exists() and stamp.read_text() == digest.hexdigest()):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o755, parents=True)
        BENCH.chmod(0o755)
        started = time.monotonic()
        build_server_venv(folder / "venv")
        print(f"built the server venv in {time.monotonic() - started:.0f}s", file=sys.stderr)
        stamp.write_text(digest.hexdigest())
    return folder / "venv" / "bin" / "pgkeeper"


def age_keys(folder: Path) -> tuple[Path, str]:
    """An age identity file the server's user can read (restore_command decrypts with it) and
    its public key, made once per run."""
    from pyrage import x25519

    key = x25519.Identity.generate()
    path = folder / "restore-key.txt"
    path.write_text(f"{key}\n")
    path.chmod(0o600)
    chown(path)
    return path, str(key.to_public())


AGE_MAGIC = b"age-encryption.org/v1\n"


def check_sealed(backups: Path, base: bool = False) -> int:
    """The encrypted cases must have measured encryption: every archived WAL file (and the base
    backup, when one was taken) is an age file. Returns the number of WAL files checked."""
    wal_files = [p for p in (backups / "wal").rglob("*") if p.is_file()]
    bases = [p for p in backups.glob("base_*/*") if p.name != "manifest.json"] if base else []
    if not wal_files or (base and not bases):
        raise RuntimeError(f"nothing archived under {backups}")
    for path in (*wal_files, *bases):
        with path.open("rb") as stream:
            if not (path.name.endswith(".age") and stream.read(len(AGE_MAGIC)) == AGE_MAGIC):
                raise RuntimeError(f"{path} is not an age file: the encrypted case was not")
    return len(wal_files)


def chown(path: Path) -> Path:
    if AS_ROOT:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)
    return path


def as_server(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if AS_ROOT else argv


# --- CPU of archiving ------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class HelperCpu:
    """Samples detached archiving helpers (pgkeeper's pusher, pgBackRest's async process):
    nobody we can ask reaps them, so their CPU is read from /proc while they run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                line = _cmdline(pid)
                if self.marker not in line or not ("wal_async" in line or "async" in line):
                    continue
                stat = _stat(pid)
                if stat is not None:
                    self.seen[pid] = (int(stat[11]) + int(stat[12])) / CLK_TCK
            time.sleep(0.1)  # scanning /proc costs CPU too; helpers idle before they exit

    def seconds(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def archiver_cpu(cluster: PgCluster) -> float:
    """The archiver's CPU plus that of every archive_command it ran (reaped children)."""
    row = cluster.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'")
    stat = _stat(int(row[0][0])) if row else None
    if stat is None:
        return 0.0
    return sum(int(stat[i]) for i in (11, 12, 13, 14)) / CLK_TCK


# --- one archiving run ---------------------------------------------------------------------------


@dataclass
class ArchiveRun:
    case: str
    load_s: float
    segments: int
    archived_at_end: int
    waiting_at_end: int
    catch_up_s: float
    rate: float  # segments per second over load + catch-up
    cpu_s: float


@dataclass
class DrainRun:
    case: str
    backlog: int  # segments waiting when archive_command was set
    seconds: float  # until none waits
    rate: float  # segments per second: the archiver's capacity
    cpu_s: float


def waiting(cluster: PgCluster) -> int:
    return int(cluster.query(
        "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
    )[0][0])  # fmt: skip


def segment_number(cluster: PgCluster) -> int:
    name = cluster.query("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    return int(name[8:16], 16) * 256 + int(name[16:24], 16)


def archived_count(cluster: PgCluster) -> int:
    return int(cluster.query("SELECT archived_count FROM pg_stat_archiver")[0][0])


def pgbackrest_config(work: Path, data_dir: Path, socket_dir: Path, port: int) -> Path:
    repo, spool, logs = work / "pgbr-repo", work / "pgbr-spool", work / "pgbr-log"
    for folder in (repo, spool, logs, work / "pgbr-lock"):
        folder.mkdir()
        chown(folder)
    conf = work / "pgbackrest.conf"
    conf.write_text(
        f"[global]\nrepo1-path={repo}\ncompress-type=zst\narchive-async=y\nspool-path={spool}\n"
        f"process-max=2\nlog-path={logs}\nlock-path={work / 'pgbr-lock'}\nlog-level-file=off\n"
        f"[bench]\npg1-path={data_dir}\npg1-socket-path={socket_dir}\npg1-port={port}\n"
    )
    conf.chmod(0o644)
    return conf


def archive_command(case: str, work: Path, server: Path) -> str:
    if case == "cp":
        folder = work / "cp-archive"
        folder.mkdir()
        chown(folder)
        return f"test ! -f {folder}/%f && cp %p {folder}/%f"
    if case == "pgbackrest-async":
        return f"pgbackrest --config={work / 'pgbackrest.conf'} --stanza=bench archive-push %p"
    backups = work / "backups"
    backups.mkdir()
    chown(backups)
    lines = {"BACKUP_DIR": str(backups)}
    if case == "pgkeeper-sync":
        lines["BACKUP_WAL_ASYNC"] = "false"
    if case == "pgkeeper-age":
        lines["BACKUP_ENCRYPTION_RECIPIENTS"] = age_keys(work)[1]
    env_file = make_env_file(work, lines)
    return f"{server} --env-file {env_file} wal-push %p"


def _set_command(cluster: PgCluster, command: str) -> None:
    quoted = command.replace("'", "''")
    cluster.execute(f"ALTER SYSTEM SET archive_command = '{quoted}'")
    cluster.execute("SELECT pg_reload_conf()")


def _prepare(case: str, work: Path, cluster: PgCluster) -> None:
    if case == "pgbackrest-async":
        conf = pgbackrest_config(work, cluster.data_dir, cluster.socket_dir, cluster.port)
        done = subprocess.run(
            as_server(["pgbackrest", f"--config={conf}", "--stanza=bench", "stanza-create"]),
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pgbackrest stanza-create: {done.stdout}{done.stderr}")


def run_drain_case(case: str, scale: int, server: Path) -> DrainRun:
    """The archiver's capacity: the load runs with archive_command unset (WAL piles up as
    .ready files), then the command is set and the backlog timed until it is archived."""
    work = shared_dir("pgkeeper-bench-pitr-")
    try:
        cluster = PgCluster(settings={"wal_level": "replica", "archive_mode": "on",
                                      "archive_command": "''", "max_wal_size": "4GB"})  # fmt: skip
        cluster.start()
        try:
            _prepare(case, work, cluster)
            command = archive_command(case, work, server)
            env = {**os.environ, **cluster.libpq_env()}
            subprocess.run([str(pg_bindir() / "pgbench"), "-i", "-s", str(scale), "-q"],
                           env=env, check=True, capture_output=True)  # fmt: skip
            cluster.execute("SELECT pg_switch_wal()")
            time.sleep(0.5)
            backlog = waiting(cluster)
            marker = str(work) if case.startswith("pgbackrest") else str(cluster.data_dir)
            helpers = HelperCpu(marker)
            cpu_before = archiver_cpu(cluster)
            _set_command(cluster, command)
            seconds = _wait_idle(cluster, 600)
            cpu = archiver_cpu(cluster) - cpu_before + helpers.seconds()
            if case == "pgkeeper-age":
                check_sealed(work / "backups")
            return DrainRun(case, backlog, seconds, backlog / seconds, cpu)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_archive_case(case: str, scale: int, server: Path) -> ArchiveRun:
    work = shared_dir("pgkeeper-bench-pitr-")
    try:
        cluster = PgCluster(settings={"wal_level": "replica", "archive_mode": "on",
                                      "archive_command": "'/bin/true'",
                                      "max_wal_size": "4GB"})  # fmt: skip
        cluster.start()
        try:
            _prepare(case, work, cluster)
            _set_command(cluster, archive_command(case, work, server))
            cluster.execute("SELECT pg_switch_wal()")
            _wait_idle(cluster, 60)
            marker = str(work) if case.startswith("pgbackrest") else str(cluster.data_dir)
            helpers = HelperCpu(marker)
            cpu_before = archiver_cpu(cluster)
            archived_before = archived_count(cluster)
            first = segment_number(cluster)
            env = {**os.environ, **cluster.libpq_env()}
            started = time.monotonic()
            subprocess.run([str(pg_bindir() / "pgbench"), "-i", "-s", str(scale), "-q"],
                           env=env, check=True, capture_output=True)  # fmt: skip
            load = time.monotonic() - started
            archived_end = archived_count(cluster) - archived_before
            waiting_end = waiting(cluster)
            segments = segment_number(cluster) - first
            caught = _wait_idle(cluster, 600)
            total = time.monotonic() - started
            cpu = archiver_cpu(cluster) - cpu_before + helpers.seconds()
            if case == "pgkeeper-age":
                check_sealed(work / "backups")
            return ArchiveRun(case, load, segments, archived_end, waiting_end,
                              caught, segments / total, cpu)  # fmt: skip
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait_idle(cluster: PgCluster, timeout: float) -> float:
    started = time.monotonic()
    while waiting(cluster) > 0:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"archiving did not catch up in {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - started


# --- restore ------------------------------------------------------------------------------------


@dataclass
class RestoreRun:
    case: str
    seconds: float
    segments: int


READY = "database system is ready to accept connections"


def _wait_promoted(folder: Path, log: Path, timeout: float = 600) -> None:
    started = time.monotonic()
    while (folder / "recovery.signal").exists() or READY not in _read(log):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"no promotion in {timeout}s: {_read(log)[-2000:]}")
        if "FATAL" in _read(log):
            raise RuntimeError(_read(log)[-2000:])
        time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextmanager
def restore_bench_cluster(
    scale: int, server: Path, encrypted: bool = False
) -> Iterator[dict[str, Any]]:
    work = shared_dir("pgkeeper-bench-restore-")
    cp_dir, backups = work / "cp-archive", work / "backups"
    for folder in (cp_dir, backups):
        folder.mkdir()
        chown(folder)
    lines = {"BACKUP_DIR": str(backups), "BACKUP_PITR_PGKEEPER": str(server)}
    identity = None
    if encrypted:
        identity, lines["BACKUP_ENCRYPTION_RECIPIENTS"] = age_keys(work)
    env_file = make_env_file(work, lines)
    command = f"'cp %p {cp_dir}/%f && {server} --env-file {env_file} wal-push %p'"
    cluster = PgCluster(settings={"wal_level": "replica", "archive_mode": "on",
                                  "archive_command": command, "max_wal_size": "4GB"},
                        replication=True)  # fmt: skip
    cluster.start()
    try:
        env = {**os.environ, **cluster.libpq_env()}
        plain = work / "plain-base"
        subprocess.run([str(pg_bindir() / "pg_basebackup"), "-D", str(plain), "-Fp",
                        "-X", "none", "-c", "fast"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        made = subprocess.run([str(PGKEEPER), "--env-file", str(env_file), "base-backup"],
                              env={**_clean(), "DATABASE_URL": cluster.url()},
                              capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(made.stderr)
        first = segment_number(cluster)
        subprocess.run([str(pg_bindir() / "pgbench"), "-i", "-s", str(scale), "-q"],
                       env=env, check=True, capture_output=True)  # fmt: skip
        cluster.execute("SELECT pg_switch_wal()")
        _wait_idle(cluster, 600)
        if encrypted:
            check_sealed(backups, base=True)
        yield {"work": work, "cp_dir": cp_dir, "plain": plain, "env_file": env_file,
               "segments": segment_number(cluster) - first, "identity": identity}  # fmt: skip
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def _clean() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BACKUP_"))}


def restore_baseline(setup: dict[str, Any]) -> RestoreRun:
    folder = setup["work"] / "restore-cp"
    port = free_port("127.0.0.1")
    started = time.monotonic()
    shutil.copytree(setup["plain"], folder, symlinks=True)
    with (folder / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"\nrestore_command = 'cp {setup['cp_dir']}/%f %p'\narchive_mode = off\n"
                   f"port = {port}\n")  # fmt: skip
    (folder / "recovery.signal").write_text("")
    chown(folder)
    log = folder / "restore.log"
    try:
        subprocess.run(as_server([str(pg_bindir() / "pg_ctl"), "start", "-W", "-D",
                                  str(folder), "-l", str(log)]), check=True,
                       capture_output=True, cwd="/")  # fmt: skip
        _wait_promoted(folder, log)
        return RestoreRun("pg_basebackup+cp", time.monotonic() - started, setup["segments"])
    finally:
        stop_data_dir(folder)
        shutil.rmtree(folder, ignore_errors=True)


def restore_pgkeeper(setup: dict[str, Any]) -> RestoreRun:
    folder = setup["work"] / "restore-pgkeeper"
    port = free_port("127.0.0.1")
    identity = setup["identity"]
    extra = ["--identity", str(identity)] if identity is not None else []
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(PGKEEPER), "--env-file", str(setup["env_file"]), "pitr", "restore", "--latest",
             "--to", str(folder), "--start", "--port", str(port), *extra],
            env=_clean(), capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr + done.stdout)
        case = "pgkeeper-age" if identity is not None else "pgkeeper"
        return RestoreRun(case, time.monotonic() - started, setup["segments"])
    finally:
        stop_data_dir(folder)
        shutil.rmtree(folder, ignore_errors=True)


# --- the report -----------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(value: float, baseline: float) -> str:
    """value / baseline as `1.23x`, or `—` when the baseline was not among the cases run."""
    return f"{value / baseline:.2f}x" if baseline == baseline and baseline > 0 else "—"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--scale", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-restore", action="store_true")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if "pgbackrest-async" in cases and shutil.which("pgbackrest") is None:
        print("pgbackrest is not installed: PGKEEPER_BENCH_PITR=1 scripts/system-deps.sh",
              file=sys.stderr)  # fmt: skip
        return 2
    server = server_pgkeeper()
    runs: list[ArchiveRun] = []
    for round_ in range(args.rounds):
        for case in cases:
            run = run_archive_case(case, args.scale, server)
            print(f"round {round_ + 1} {case}: {asdict(run)}", file=sys.stderr)
            runs.append(run)
    drains: list[DrainRun] = []
    for round_ in range(args.rounds):
        for case in cases:
            drain = run_drain_case(case, args.scale, server)
            print(f"round {round_ + 1} drain {asdict(drain)}", file=sys.stderr)
            drains.append(drain)
    restores: list[RestoreRun] = []
    if not args.no_restore:
        with contextlib.ExitStack() as stack:
            setup = stack.enter_context(restore_bench_cluster(args.scale, server))
            steps = [(restore_baseline, setup), (restore_pgkeeper, setup)]
            if "pgkeeper-age" in cases:
                sealed = stack.enter_context(restore_bench_cluster(args.scale, server, True))
                steps.append((restore_pgkeeper, sealed))
            for round_ in range(args.rounds):
                for function, chosen in steps:
                    result = function(chosen)
                    print(f"round {round_ + 1} restore {asdict(result)}", file=sys.stderr)
                    restores.append(result)
    print(f"\nArchiving under `pgbench -i -s {args.scale}` (medians of {args.rounds}):\n")
    print("| archive_command | load | segments | archived at end | waiting at end | "
          "caught up after | segments/s | CPU | CPU vs pgkeeper |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    cpu_base = median([r.cpu_s for r in runs if r.case == "pgkeeper"])
    for case in cases:
        mine = [r for r in runs if r.case == case]
        cpu = median([r.cpu_s for r in mine])
        print(
            f"| {case} | {median([r.load_s for r in mine]):.2f} s "
            f"| {median([r.segments for r in mine]):.0f} "
            f"| {median([r.archived_at_end for r in mine]):.0f} "
            f"| {median([r.waiting_at_end for r in mine]):.0f} "
            f"| {median([r.catch_up_s for r in mine]):.2f} s "
            f"| {median([r.rate for r in mine]):.1f} "
            f"| {cpu:.2f} s | {ratio(cpu, cpu_base)} |"
        )
    print(f"\nDraining a backlog (the load ran with no archive_command; medians of "
          f"{args.rounds}):\n")  # fmt: skip
    print("| archive_command | backlog | archived in | segments/s | rate vs pgkeeper | CPU | "
          "CPU vs pgkeeper |\n|---|---|---|---|---|---|---|")  # fmt: skip
    rate_base = median([d.rate for d in drains if d.case == "pgkeeper"])
    cpu_base = median([d.cpu_s for d in drains if d.case == "pgkeeper"])
    for case in cases:
        mine_d = [d for d in drains if d.case == case]
        rate, cpu = median([d.rate for d in mine_d]), median([d.cpu_s for d in mine_d])
        print(
            f"| {case} | {median([d.backlog for d in mine_d]):.0f} "
            f"| {median([d.seconds for d in mine_d]):.2f} s "
            f"| {rate:.1f} | {ratio(rate, rate_base)} "
            f"| {cpu:.2f} s | {ratio(cpu, cpu_base)} |"
        )
    if restores:
        print(f"\nPITR restore of the same archive (medians of {args.rounds}):\n")
        print("| restore | wall | vs pg_basebackup+cp | segments replayed |\n|---|---|---|---|")
        wall_base = median([r.seconds for r in restores if r.case == "pg_basebackup+cp"])
        for case in ("pg_basebackup+cp", "pgkeeper", "pgkeeper-age"):
            mine = [r for r in restores if r.case == case]
            if not mine:
                continue
            wall = median([r.seconds for r in mine])
            print(f"| {case} | {wall:.2f} s | {ratio(wall, wall_base)} | {mine[0].segments} |")
    BENCH.mkdir(exist_ok=True)
    (BENCH / "pitr-results.json").write_text(json.dumps(
        {"scale": args.scale, "rounds": args.rounds, "archive": [asdict(r) for r in runs],
         "drain": [asdict(d) for d in drains], "restore": [asdict(r) for r in restores]},
        indent=2,
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
