"""Import detection: a dump is recognised by content (format x compression); the rest refused.

The dumps in `tests/unit/data/` are real `pg_dump` outputs of a two-table database named
`sample` (regenerate them with `python -m tests.unit.data.generate`); the compressed variants
are made here. Importing runs `pg_restore --list` (a client binary, no server).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from pgkeeper import catalog
from pgkeeper.errors import NotADumpError
from pgkeeper.importing import detect, import_file, import_stream, parse_archive_header
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import LocalStorage

DATA = Path(__file__).parent / "data"
SAMPLES = {
    "custom": "sample.custom.dump",
    "plain": "sample.plain.sql",
    "tar": "sample.tar",
    "directory": "sample.dir.tar",
}
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: data,
    "gzip": gzip.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + b"\0" * 200


def _sample(fmt: str) -> bytes:
    return (DATA / SAMPLES[fmt]).read_bytes()


def _tar(members: list[tuple[str, bytes | None]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _members(archive_bytes: bytes) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = []
    with tarfile.open(fileobj=io.BytesIO(archive_bytes)) as archive:
        for member in archive:
            handle = archive.extractfile(member)
            out.append((member.name, handle.read() if handle else None))
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(backup_dir=str(tmp_path / "backups"))


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("fmt", ["custom", "plain", "tar", "directory"])
def test_real_dumps_are_detected(fmt: str, compression: str) -> None:
    """Each pg_dump format is recognised from its first bytes, raw or gzip/zstd compressed."""
    kind = detect(COMPRESS[compression](_sample(fmt)))
    assert kind.format == fmt
    assert kind.compression == compression


@pytest.mark.parametrize("fmt", ["custom", "tar"])
def test_archive_header_names_the_database_and_versions(fmt: str) -> None:
    """Custom and tar archives tell their database name and server/pg_dump versions."""
    kind = detect(_sample(fmt))
    assert kind.database == "sample"
    assert kind.server_version.startswith("15.")
    assert kind.pg_dump_version.startswith("15.")


def test_plain_dump_versions_are_read_from_its_comments() -> None:
    """A plain dump's header comments give the versions."""
    kind = detect(_sample("plain"))
    assert kind.server_version.startswith("15.")
    assert kind.pg_dump_version.startswith("15.")


def test_detection_needs_only_the_head() -> None:
    """A truncated head (the first 64 KiB of a big dump) is enough to detect the format."""
    big = _sample("plain") + b"COPY public.t (a) FROM stdin;\n" + b"x\n" * 200_000
    assert detect(gzip.compress(big)[:65536]).format == "plain"
    assert detect(zstandard.ZstdCompressor().compress(big)[:65536]).format == "plain"


def test_directory_tar_with_a_big_first_data_file() -> None:
    """A directory dump whose toc.dat comes after a data file larger than the head is detected."""
    archive = _tar([("d.dir/", None), ("d.dir/3344.dat.gz", os.urandom(200_000)),
                    ("d.dir/toc.dat", b"PGDMP")])  # fmt: skip
    assert detect(archive[:65536]).format == "directory"


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_directory_tar_in_gnu_and_pax_formats(tar_format: int) -> None:
    """`tar --format=gnu|posix` of a directory dump (pax extended headers first) is detected."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format,
                      pax_headers={"comment": "made by tar"}) as archive:  # fmt: skip
        for name, data in _members(_sample("directory")):
            info = tarfile.TarInfo(name)
            info.pax_headers = {"mtime": "1700000000.5"}  # forces a per-member pax header
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    assert detect(buffer.getvalue()).format == "directory"


def test_tar_of_a_directory_dump_made_from_inside_it() -> None:
    """`tar -cf x.tar -C dump.dir .` (members `./toc.dat` ...) is a directory dump."""
    members = [(f"./{Path(n).name}" if d is not None else "./", d)
               for n, d in _members(_sample("directory"))]  # fmt: skip
    assert detect(_tar(members)).format == "directory"


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("garbage", b"\x00\x01\x02 this is not a dump at all " * 40),
        ("empty", b""),
        ("png", PNG),
        ("text", b"hello world\n" * 100),
        ("sql without pg_dump header", b"CREATE TABLE t (a int);\nINSERT INTO t VALUES (1);\n"),
        ("random tar", _tar([("notes.txt", b"hello"), ("photo.png", PNG)])),
        ("random tar with a folder", _tar([("photos/", None), ("photos/a.png", PNG)])),
        ("tar of nested files", _tar([("a/b/toc.txt", b"x")])),
        ("gzip of garbage", gzip.compress(b"not a dump" * 100)),
        ("zstd of a png", zstandard.ZstdCompressor().compress(PNG)),
        ("gzip of a random tar", gzip.compress(_tar([("notes.txt", b"hello")]))),
        ("corrupt gzip", b"\x1f\x8b\x08\x00" + b"\xff" * 100),
        ("corrupt zstd", b"\x28\xb5\x2f\xfd" + b"\xff" * 100),
    ],
)
def test_non_dumps_are_refused(what: str, data: bytes) -> None:
    """Anything that is not a pg_dump output is a NotADumpError (exit 2), one line."""
    with pytest.raises(NotADumpError) as info:
        detect(data)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    assert "not a" in str(info.value)


CLUSTER_DUMP = (
    b"--\n-- PostgreSQL database cluster dump\n--\n\nSET default_transaction_read_only = off;\n"
    b"CREATE ROLE app;\n\\connect template1\n\n--\n-- PostgreSQL database dump\n--\n"
)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_cluster_dumps_are_refused(compression: str) -> None:
    """pg_dumpall output (roles, CREATE DATABASE, \\connect) cannot restore into one database."""
    with pytest.raises(NotADumpError, match="pg_dumpall"):
        detect(COMPRESS[compression](CLUSTER_DUMP))


def test_parse_archive_header_of_garbage_is_empty() -> None:
    """A header that is not PGDMP, or is cut short, gives no fields rather than an error."""
    assert parse_archive_header(b"nothing") == {}
    assert parse_archive_header(_sample("custom")[:20]) == {}


@pytest.mark.parametrize("fmt", ["custom", "plain", "tar", "directory"])
def test_import_stores_and_verifies_each_format(settings: Settings, fmt: str) -> None:
    """import_stream stores a real dump as a listed, verified backup named after its database."""
    data = COMPRESS["zstd"](_sample(fmt)) if fmt != "directory" else _sample(fmt)
    storage = LocalStorage(settings.backup_dir)
    manifest = import_stream(settings, io.BytesIO(data).read, name="ext", storage=storage)
    assert manifest.format == fmt
    assert manifest.trigger == "import"
    assert manifest.verified
    assert manifest.database == ("unknown" if fmt == "plain" else "sample")
    assert [m.id for m in catalog.list_backups(storage)] == [manifest.id]
    assert catalog.list_incomplete(storage) == []


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("random tar", _tar([("notes.txt", b"hello")])),
        ("png", PNG),
        ("truncated custom dump", _sample("custom")[:1500]),
        ("truncated zstd plain dump", COMPRESS["zstd"](_sample("plain"))[:-20]),
        ("plain dump without its trailer", _sample("plain")[:-300]),
    ],
)
def test_failed_import_leaves_nothing(settings: Settings, what: str, data: bytes) -> None:
    """A refused import raises NotADumpError and leaves no backup, folder or temp file."""
    root = Path(settings.backup_dir)
    with pytest.raises(NotADumpError):
        import_stream(settings, io.BytesIO(data).read, storage=LocalStorage(root))
    assert not root.exists() or list(root.rglob("*")) == []


def test_import_file_refuses_a_folder(settings: Settings, tmp_path: Path) -> None:
    """A directory-format dump folder must be tarred first; the error says how."""
    folder = tmp_path / "dump.dir"
    folder.mkdir()
    with pytest.raises(NotADumpError, match="tar -cf"):
        import_file(settings, folder)


def test_import_of_an_empty_file_is_refused(settings: Settings, tmp_path: Path) -> None:
    """An empty file is not a dump."""
    empty = tmp_path / "empty.dump"
    empty.write_bytes(b"")
    with pytest.raises(NotADumpError, match="empty"):
        import_file(settings, empty)
