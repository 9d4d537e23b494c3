"""Streaming: compress_stream and Decoder round-trip every compression; bad streams are caught."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import time

import pytest
import zstandard

from pgkeeper.errors import DumpError, VerificationError
from pgkeeper.pipeline import ClientProcess, Decoder, compress_stream, make_compressor

COMPRESSIONS = ("zstd", "gzip", "none")


def _payload(size: int = 3 * 1024 * 1024 + 17) -> bytes:
    """Half random, half repetitive: several chunks, compressible but not trivially."""
    rnd = os.urandom(size // 2)
    text = b"COPY public.t (a, b) FROM stdin;\n1\tx\n\\.\n" * (size // 80)
    return rnd + text[: size - len(rnd)]


def _compress(data: bytes, compression: str, **kw: int) -> tuple[bytes, object]:
    out = io.BytesIO()
    result = compress_stream(io.BytesIO(data).read, out, compression, **kw)
    return out.getvalue(), result


def _decode(stored: bytes, compression: str, step: int = 65536) -> bytes:
    decoder = Decoder(compression)
    parts = [decoder.decompress(stored[i : i + step]) for i in range(0, len(stored), step)]
    decoder.finish()
    return b"".join(parts)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compress_then_decode_round_trip(compression: str) -> None:
    """What compress_stream stores decodes back to the exact input, whatever the chunking."""
    data = _payload()
    stored, result = _compress(data, compression)
    assert _decode(stored, compression) == data
    assert _decode(stored, compression, step=1000) == data
    assert result.raw_size == len(data)  # type: ignore[attr-defined]
    assert result.size == len(stored)  # type: ignore[attr-defined]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_sha256_is_of_the_stored_bytes(compression: str) -> None:
    """The recorded sha256 is what `sha256sum` of the stored file says."""
    stored, result = _compress(_payload(200_000), compression)
    assert result.sha256 == hashlib.sha256(stored).hexdigest()  # type: ignore[attr-defined]


def test_stored_streams_are_readable_by_standard_tools() -> None:
    """zstd output is a standard zstd frame and gzip output a standard gzip member."""
    data = _payload(500_000)
    zst, _ = _compress(data, "zstd")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst) == data
    gz, _ = _compress(data, "gzip")
    assert gzip.decompress(gz) == data


def test_zstd_multithreaded_output_round_trips() -> None:
    """zstd with worker threads produces a stream the Decoder reads back."""
    data = _payload()
    stored, _ = _compress(data, "zstd", threads=2, level=1)
    assert _decode(stored, "zstd") == data


def test_empty_input_still_makes_a_valid_stream() -> None:
    """An empty source gives a complete (empty) frame/member that decodes to nothing."""
    for compression in ("zstd", "gzip"):
        stored, result = _compress(b"", compression)
        assert stored
        assert _decode(stored, compression) == b""
        assert result.raw_size == 0  # type: ignore[attr-defined]


def test_progress_reports_every_raw_byte() -> None:
    """The progress callback is told about every byte read from the source."""
    seen: list[int] = []
    data = _payload()
    compress_stream(io.BytesIO(data).read, io.BytesIO(), "zstd", progress=seen.append)
    assert sum(seen) == len(data)


def test_decoder_reads_concatenated_zstd_frames() -> None:
    """Several zstd frames one after another (e.g. `cat a.zst b.zst`) decode as one stream."""
    c = zstandard.ZstdCompressor(write_checksum=True)
    stored = c.compress(b"first frame\n") + c.compress(b"") + c.compress(b"second frame\n" * 1000)
    assert _decode(stored, "zstd", step=7) == b"first frame\n" + b"second frame\n" * 1000


def test_decoder_reads_concatenated_gzip_members() -> None:
    """Several gzip members one after another (e.g. `cat a.gz b.gz`) decode as one stream."""
    stored = gzip.compress(b"alpha\n") + gzip.compress(b"beta\n" * 5000)
    assert _decode(stored, "gzip", step=11) == b"alpha\n" + b"beta\n" * 5000


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_truncated_stream_fails_the_compression_check(compression: str) -> None:
    """A stream cut short raises VerificationError naming the compression check."""
    stored, _ = _compress(_payload(400_000), compression)
    decoder = Decoder(compression)
    with pytest.raises(VerificationError) as info:
        decoder.decompress(stored[: len(stored) // 2])
        decoder.finish()
    assert info.value.check == "compression"
    assert compression in str(info.value)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_stream_cut_at_a_frame_boundary_plus_a_few_bytes_is_truncated(compression: str) -> None:
    """A complete frame followed by the first bytes of another is still a truncation."""
    first, _ = _compress(b"complete\n", compression)
    second, _ = _compress(_payload(100_000), compression)
    decoder = Decoder(compression)
    with pytest.raises(VerificationError) as info:
        decoder.decompress(first + second[:20])
        decoder.finish()
    assert info.value.check == "compression"


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_empty_stream_is_truncated(compression: str) -> None:
    """Zero bytes are not a valid zstd/gzip stream."""
    decoder = Decoder(compression)
    decoder.decompress(b"")
    with pytest.raises(VerificationError) as info:
        decoder.finish()
    assert info.value.check == "compression"


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_corrupted_byte_fails_the_compression_check(compression: str) -> None:
    """One flipped byte in the middle of the stream raises VerificationError (compression)."""
    data = _payload(600_000)
    stored, _ = _compress(data, compression)
    broken = bytearray(stored)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(VerificationError) as info:
        _decode(bytes(broken), compression)
    assert info.value.check == "compression"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_trailing_garbage_fails_the_compression_check(compression: str) -> None:
    """Bytes after the last frame that are not another frame are refused."""
    stored, _ = _compress(b"hello\n" * 100, compression)
    with pytest.raises(VerificationError) as info:
        _decode(stored + b"this is not a frame at all", compression)
    assert info.value.check == "compression"


def test_none_decoder_passes_bytes_through() -> None:
    """With no compression the decoder is the identity and finish() never fails."""
    decoder = Decoder("none")
    assert decoder.decompress(b"abc") == b"abc"
    decoder.finish()


def test_unknown_compression_is_refused() -> None:
    """make_compressor refuses a compression it does not know."""
    with pytest.raises(ValueError):
        make_compressor("lz4")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_client_process_is_killed_when_the_block_raises() -> None:
    """Leaving a ClientProcess block by an exception terminates its child and reaps it."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(RuntimeError), ClientProcess(argv, dict(os.environ)) as proc:
        pid = proc.proc.pid
        assert _alive(pid)
        raise RuntimeError("the storage failed")
    assert time.monotonic() - started < 10
    assert proc.proc.returncode is not None
    assert not _alive(pid)


@pytest.mark.slow
def test_client_process_killed_even_if_it_ignores_sigterm() -> None:
    """A child that ignores SIGTERM is SIGKILLed after the grace period (5 s)."""
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('r', flush=True); time.sleep(60)"
    )
    argv = [sys.executable, "-c", code]
    with pytest.raises(RuntimeError), ClientProcess(argv, dict(os.environ)) as proc:
        assert proc.proc.stdout is not None
        proc.proc.stdout.readline()  # the handler is installed
        raise RuntimeError("boom")
    assert proc.proc.returncode == -9


def test_client_process_collects_the_last_error_line() -> None:
    """stderr is drained and the last error line is what messages quote."""
    code = (
        "import sys; sys.stderr.write('pg_dump: notice\\npg_dump: error: connection lost\\n"
        "pg_dump: detail\\n'); sys.exit(1)"
    )
    with ClientProcess([sys.executable, "-c", code], dict(os.environ)) as proc:
        assert proc.wait() == 1
    assert proc.last_error() == "pg_dump: error: connection lost"


def test_client_process_that_cannot_start_is_a_dump_error() -> None:
    """A missing binary is a one-line DumpError pointing at PG_BIN_DIR."""
    with pytest.raises(DumpError, match="PG_BIN_DIR"):
        ClientProcess(["/nonexistent/pg_dump"], dict(os.environ))


def test_client_process_child_does_not_survive_a_normal_exit() -> None:
    """A clean exit from the block waits for the child, leaving no zombie."""
    with ClientProcess([sys.executable, "-c", "print('x')"], dict(os.environ)) as proc:
        assert proc.proc.stdout is not None
        assert proc.proc.stdout.read() == b"x\n"
    assert proc.proc.returncode == 0
