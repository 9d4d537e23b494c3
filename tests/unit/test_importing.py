"""Import detection: a dump is recognised by content (format x compression); the rest refused.

The dumps in `tests/unit/data/` are real `pg_dump` outputs of a two-table database named
`sample` (regenerate them with `python -m tests.unit.data.generate`); the compressed variants
are made here. Importing runs `pg_restore` (a client binary, no server) over the whole archive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from pgkeeper import catalog
from pgkeeper.errors import NotADumpError, VerificationError
from pgkeeper.importing import detect, import_file, import_stream, parse_archive_header
from pgkeeper.manifest import Manifest, StoredObject
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import LocalStorage
from pgkeeper.verify import verify_backup

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


# --- issue 10: hostile plain dumps and cut-off archives are refused --------------------------


def _with_line(line: bytes) -> bytes:
    """The sample plain dump (header, \\restrict, ..., trailer) with ``line`` after its first
    SET: line 11 of the file."""
    plain = _sample("plain")
    anchor = b"SET statement_timeout = 0;\n"
    assert plain.count(anchor) == 1
    return plain.replace(anchor, anchor + line)


def _own_key() -> bytes:
    return _sample("plain").split(b"\\restrict ", 1)[1].split(b"\n", 1)[0]


HOSTILE_LINES = {
    "shell": (b"\\! touch /tmp/pgkeeper-marker\n", "\\!"),
    "output file": (b"\\o /tmp/pgkeeper-out\n", "\\o"),
    "copy to program": (b"\\copy item to program 'touch /tmp/pgkeeper-marker'\n", "\\copy"),
    "include": (b"\\i /tmp/pgkeeper-other.sql\n", "\\i"),
    "after a statement": (b"SELECT 1; \\! touch /tmp/pgkeeper-marker\n", "\\!"),
    "pg_dump's key undone": (
        b"\\unrestrict " + _own_key() + b"\n\\! touch /tmp/pgkeeper-marker\n",
        "\\!",
    ),
    "connect": (b"\\connect postgres\n", "\\connect"),
}


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_a_plain_dump_with_a_meta_command_is_refused(
    settings: Settings, case: str, compression: str
) -> None:
    """A plain dump holding a psql meta-command outside COPY data (a shell command, a file
    written, a program run...) is no importable dump: one line naming the command and its
    line, nothing stored."""
    line, command = HOSTILE_LINES[case]
    data = COMPRESS[compression](_with_line(line))
    root = Path(settings.backup_dir)
    with pytest.raises(NotADumpError) as info:
        import_stream(settings, io.BytesIO(data).read, storage=LocalStorage(root))
    message = str(info.value)
    assert f"psql meta-command {command} at line " in message
    assert "\n" not in message
    if command == "\\connect":
        assert "without pg_dump --create" in message
    assert not root.exists() or list(root.rglob("*")) == []


def test_a_plain_dump_keeps_its_own_restrict_lines_and_copy_backslashes(settings: Settings) -> None:
    """pg_dump's own \\restrict/\\unrestrict lines and COPY rows starting with a backslash
    (the sample's `\\\\.` row) are no reason to refuse a dump."""
    plain = _sample("plain")
    assert b"\n\\unrestrict " in plain and b"\n\\\\.\n" in plain
    storage = LocalStorage(settings.backup_dir)
    manifest = import_stream(settings, io.BytesIO(plain).read, storage=storage)
    assert manifest.verified


def _gzip_members(archive_bytes: bytes, keep: Callable[[str], bool] = lambda name: True,
                  cut: str = "") -> bytes:  # fmt: skip
    """The sample directory tar with pg_dump's data files gzipped (as `pg_dump -Fd` writes
    them), leaving out those ``keep`` refuses and cutting the one named ``cut`` short."""
    members: list[tuple[str, bytes | None]] = []
    for name, data in _members(archive_bytes):
        if data is not None and name.endswith(".dat") and not name.endswith("toc.dat"):
            name, data = name + ".gz", gzip.compress(data)
            if name.endswith(cut) and cut:
                data = data[: len(data) // 2]
        if keep(name):
            members.append((name, data))
    return _tar(members)


def _cut_in_data(data: bytes) -> bytes:
    """A custom archive cut inside its last data block (its TOC whole: --list reads it)."""
    return data[:-30]


def _cut_tar_member(data: bytes) -> bytes:
    """A tar cut inside its first data file, after toc.dat."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        member = next(m for m in archive if m.name.endswith(".dat") and m.name != "toc.dat")
    return data[: member.offset_data + member.size // 2]


CUT_ARCHIVES: dict[str, Callable[[], bytes]] = {
    "custom cut": lambda: _cut_in_data(_sample("custom")),
    "custom cut, then zstd": lambda: COMPRESS["zstd"](_cut_in_data(_sample("custom"))),
    "custom cut, then gzip": lambda: COMPRESS["gzip"](_cut_in_data(_sample("custom"))),
    "tar cut in a data file": lambda: _cut_tar_member(_sample("tar")),
    "tar cut before its end block": lambda: _sample("tar")[:-1024],
    "tar cut, then zstd": lambda: COMPRESS["zstd"](_cut_tar_member(_sample("tar"))),
    "directory with a cut .dat.gz": lambda: _gzip_members(_sample("directory"), cut="3344.dat.gz"),
    "directory without a .dat.gz": lambda: _gzip_members(
        _sample("directory"), keep=lambda name: not name.endswith("3344.dat.gz")
    ),
}


@pytest.mark.parametrize("case", sorted(CUT_ARCHIVES))
def test_a_cut_off_archive_is_refused(settings: Settings, case: str) -> None:
    """An archive cut short (its table of contents whole, so `pg_restore --list` is happy)
    fails the structure check: pg_restore read it to the end. One line, nothing stored."""
    data = CUT_ARCHIVES[case]()
    root = Path(settings.backup_dir)
    with pytest.raises(NotADumpError) as info:
        import_stream(settings, io.BytesIO(data).read, storage=LocalStorage(root))
    assert "failed the structure check" in str(info.value)
    assert "\n" not in str(info.value)
    assert not root.exists() or list(root.rglob("*")) == []


def test_a_gzipped_directory_dump_imports_whole(settings: Settings) -> None:
    """The same directory tar with every data file whole imports as verified."""
    data = _gzip_members(_sample("directory"))
    manifest = import_stream(
        settings, io.BytesIO(data).read, storage=LocalStorage(settings.backup_dir)
    )
    assert manifest.verified and manifest.format == "directory"
    assert any(o.name.endswith("3344.dat.gz") for o in manifest.objects)


def _tamper(storage: LocalStorage, manifest: Manifest, name: str, data: bytes | None) -> None:
    """Replace (None: remove) one stored object and record its new size and sha256 in the
    manifest, which still says verified: a copy stored before cut-off archives were refused."""
    path = Path(storage.root) / manifest.id / name
    objects = [o for o in manifest.objects if o.name != name]
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
        objects.append(StoredObject(name=name, size=len(data),
                                    sha256=hashlib.sha256(data).hexdigest()))  # fmt: skip
    catalog.write_manifest(storage, manifest.model_copy(update={
        "objects": objects, "size": sum(o.size for o in objects)}))  # fmt: skip


@pytest.mark.parametrize("fmt", ["custom", "tar", "directory"])
def test_a_stored_cut_off_archive_fails_full_verification(settings: Settings, fmt: str) -> None:
    """A stored archive cut short but with a manifest that matches it fails `verify` (full)
    on the structure check; quick verification, which reads the table of contents only, is
    not asked to see it."""
    storage = LocalStorage(settings.backup_dir)
    data = _gzip_members(_sample("directory")) if fmt == "directory" else _sample(fmt)
    manifest = import_stream(settings, io.BytesIO(data).read, storage=storage)
    assert manifest.verified
    if fmt == "directory":
        name = next(o.name for o in manifest.objects if o.name.endswith("3344.dat.gz"))
        stored = (Path(storage.root) / manifest.id / name).read_bytes()
        _tamper(storage, manifest, name, stored[: len(stored) // 2])
    else:
        name = manifest.objects[0].name
        cut = _cut_in_data(data) if fmt == "custom" else _cut_tar_member(data)
        _tamper(storage, manifest, name, cut)
    with pytest.raises(VerificationError) as info:
        verify_backup(settings, manifest.id, storages=[storage])
    assert info.value.check == "structure"
    assert "pg_restore could not read the archive to its end" in str(info.value) or (
        "truncated" in str(info.value)
    )
    recorded = catalog.read_manifest(storage, manifest.id)
    assert recorded is not None and recorded.verification_failed
    assert verify_backup(settings, manifest.id, storages=[storage], level="quick").verified


def test_a_stored_plain_dump_with_a_meta_command_fails_verification(settings: Settings) -> None:
    """A stored plain dump that gained a meta-command fails `verify` (full and quick, when the
    command is in the first chunk) naming the command and its line."""
    storage = LocalStorage(settings.backup_dir)
    plain = COMPRESS["zstd"](_sample("plain"))
    manifest = import_stream(settings, io.BytesIO(plain).read, storage=storage)
    hostile = COMPRESS["zstd"](_with_line(b"\\! touch /tmp/pgkeeper-marker\n"))
    _tamper(storage, manifest, manifest.objects[0].name, hostile)
    for level in ("full", "quick"):
        with pytest.raises(VerificationError, match=r"psql meta-command \\! at line 11"):
            verify_backup(settings, manifest.id, storages=[storage], level=level)
