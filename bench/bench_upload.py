"""Benchmark pgkeeper's S3 upload against a plain boto3 ``upload_file`` of the same bytes.

Starts a moto S3 server (tests/servers/s3.py), writes ``--size-mb`` MiB of random bytes to a
temporary file, then measures, ``--repeat`` times round-robin (medians reported), each in its
own subprocess so memory is that upload's alone:

  upload_file   boto3 ``upload_file`` with its defaults (8 MiB parts, 10 threads)
  pgkeeper      ``S3Storage.open_write`` fed from the file in 1 MiB reads, as a backup pipeline
                feeds it (non-seekable stream, size hint, a SHA-256 checksum on every part)
  pgkeeper+sha  the same with ``metadata={"sha256": ...}`` declared, as the upload flow copies a
                backup whose manifest holds its sha256: the writer also hashes the whole stream
                and checks it before completing (the hash is known beforehand, not timed)

For each: wall time, throughput, peak RSS (the child's VmHWM; its ru_maxrss as a cross-check)
and the RSS it started the upload with (imports and client). Prints a table with ratios and
the issue's targets (throughput >= 0.9x upload_file, peak RSS <= 150 MB at 1 GB).

    make bench UPLOAD_BENCH_ARGS="--size-mb 1024 --repeat 3"
    .venv/bin/python bench/bench_upload.py --size-mb 128          # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.servers, however this was started
    sys.path.insert(0, str(ROOT))

from tests.servers.s3 import S3Server  # noqa: E402 - needs the sys.path line above

MIB = 1024 * 1024
BUCKET = "pgkeeper-bench"
MODES = ("upload_file", "pgkeeper", "pgkeeper+sha")
TARGET_RATIO = 0.9
TARGET_RSS_MB = 150.0


def vm_hwm_mb() -> float:
    """This process's peak resident set size so far, from /proc (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- child side: one upload, results as JSON on stdout ---------------------------------------


def child(mode: str, path: Path, endpoint: str, key: str) -> None:
    size = path.stat().st_size
    if mode == "upload_file":
        server = S3Server()
        client = server.client(endpoint_url=endpoint)
        start_rss, start_cpu = vm_rss_mb(), cpu_seconds()
        started = time.perf_counter()
        client.upload_file(str(path), BUCKET, key)
    else:
        from pgkeeper.settings import Settings
        from pgkeeper.storage.s3 import S3Storage

        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]  # pydantic-settings init-only option
            aws_access_key_id=S3Server.access_key,
            aws_secret_access_key=S3Server.secret_key,
            backup_s3_endpoint_url=endpoint,
            backup_s3_region=S3Server.region,
        )
        storage = S3Storage.from_url(f"s3://{BUCKET}", settings)
        metadata = {}
        if mode == "pgkeeper+sha":
            digest = hashlib.sha256()
            with open(path, "rb") as src:
                while chunk := src.read(MIB):
                    digest.update(chunk)
            metadata["sha256"] = digest.hexdigest()
        start_rss, start_cpu = vm_rss_mb(), cpu_seconds()
        started = time.perf_counter()
        # Unbuffered reads of 1 MiB: the stream a pipeline hands over, never seeked.
        with (
            open(path, "rb", buffering=0) as src,
            storage.open_write(key, size, metadata=metadata) as out,
        ):
            while chunk := src.read(MIB):
                out.write(chunk)
    seconds = time.perf_counter() - started
    result = {
        "mode": mode,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - start_cpu,
        "bytes": size,
        "start_rss_mb": start_rss,
        "peak_rss_mb": vm_hwm_mb(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result), flush=True)


# --- parent side ----------------------------------------------------------------------------


def run_child(mode: str, path: Path, server: S3Server, key: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--file", str(path),
         "--endpoint", server.endpoint_url, "--key", key],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{mode} upload failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    head = server.client().head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != result["bytes"]:
        raise SystemExit(f"{mode}: stored {head['ContentLength']} bytes, not {result['bytes']}")
    return result


def make_file(path: Path, size_mb: int) -> None:
    """Random bytes (incompressible, like a compressed dump), written 1 MiB at a time."""
    with open(path, "wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(MIB))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="bytes to upload (MiB)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both uploads")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.file, args.endpoint, args.key)
        return

    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="pgkeeper-bench-") as tmp, S3Server() as server:
        data = Path(tmp) / "data.bin"
        print(f"writing {args.size_mb} MiB of random bytes ...", flush=True)
        make_file(data, args.size_mb)
        for round_no in range(args.repeat):
            for mode in MODES:
                server.reset()  # moto keeps everything in memory: start each upload empty
                server.make_bucket(BUCKET)
                result = run_child(mode, data, server, f"{mode}-{round_no}")
                results[mode].append(result)
                print(
                    f"  round {round_no + 1} {mode:<13} {result['seconds']:6.2f} s  "
                    f"CPU {result['cpu_seconds']:6.2f} s  "
                    f"peak RSS {result['peak_rss_mb']:6.1f} MB",
                    flush=True,
                )

    def median(mode: str, field: str) -> float:
        return statistics.median(r[field] for r in results[mode])

    size_mib = args.size_mb
    base_s = median("upload_file", "seconds")
    print()
    print(f"S3 upload of {size_mib} MiB to moto, median of {args.repeat} run(s)")
    print(f"{'':<13} {'seconds':>8} {'MiB/s':>8} {'vs upload_file':>15} {'client CPU s':>13} "
          f"{'start RSS MB':>13} {'peak RSS MB':>12}")  # fmt: skip
    for mode in MODES:
        seconds = median(mode, "seconds")
        print(
            f"{mode:<13} {seconds:8.2f} {size_mib / seconds:8.1f} {base_s / seconds:14.2f}x "
            f"{median(mode, 'cpu_seconds'):13.2f} {median(mode, 'start_rss_mb'):13.1f} "
            f"{median(mode, 'peak_rss_mb'):12.1f}"
        )
    ratio = base_s / median("pgkeeper", "seconds")
    ratio_sha = base_s / median("pgkeeper+sha", "seconds")
    peak = max(median("pgkeeper", "peak_rss_mb"), median("pgkeeper+sha", "peak_rss_mb"))
    scaled = size_mib >= 1024
    print()
    print(
        f"throughput vs upload_file: {ratio:.2f}x, with a declared sha256 {ratio_sha:.2f}x "
        f"(target >= {TARGET_RATIO}x) {'PASS' if min(ratio, ratio_sha) >= TARGET_RATIO else 'FAIL'}"
    )
    print(
        f"pgkeeper peak RSS: {peak:.1f} MB (target <= {TARGET_RSS_MB:.0f} MB at 1 GB) "
        + ("PASS" if peak <= TARGET_RSS_MB else "FAIL")
        + ("" if scaled else " (size below 1 GB: indicative only)")
    )


if __name__ == "__main__":
    main()
