"""pgkeeper.crypto: keys, fingerprints, streaming through pyrage, and what needs no key."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from pgkeeper import crypto
from pgkeeper.errors import ConfigError, IdentityError, VerificationError


def _key(tmp_path: Path, name: str = "key") -> tuple[Path, str]:
    identity = x25519.Identity.generate()
    path = tmp_path / f"{name}.txt"
    path.write_text(f"# created: test\n# public key: {identity.to_public()}\n{identity}\n")
    return path, str(identity.to_public())


def _encrypt(data: bytes, recipients: crypto.Recipients) -> bytes:
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(data).read, out.write, recipients)
    return out.getvalue()


def test_recipients_inline_comma_newline_or_a_file(tmp_path: Path) -> None:
    """Public keys are read inline (commas or newlines) or from a file with comments."""
    _, a = _key(tmp_path, "a")
    _, b = _key(tmp_path, "b")
    assert len(crypto.Recipients.parse(f"{a},{b}").keys) == 2
    assert len(crypto.Recipients.parse(f"{a}\n{b}\n").keys) == 2
    listing = tmp_path / "recipients.txt"
    listing.write_text(f"# the restore team\n{a}\n\n{b}  \n")
    parsed = crypto.Recipients.parse(str(listing))
    assert [k.kind for k in parsed.keys] == ["x25519", "x25519"]
    printed = parsed.fingerprints()
    assert all(f["fingerprint"].startswith("SHA256:") for f in printed)
    assert a not in repr(printed) and a not in repr(parsed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("age1notakey", "not a valid age public key"),
        ("ssh-ed25519 AAAAnotbase64!!", "not a valid ssh-ed25519 public key"),
        ("ecdsa-sha2-nistp256 AAAA", "not a public key pgkeeper can encrypt to"),
        ("# only a comment\n", "holds no public key"),
    ],
)
def test_bad_recipients_are_one_line_config_errors(value: str, expected: str) -> None:
    """Each bad entry is named by position, with what to use instead."""
    with pytest.raises(ConfigError, match=expected):
        crypto.Recipients.parse(value)


def test_a_private_key_as_recipient_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """A secret key in the recipients (inline or in the file) never appears in the error."""
    identity = x25519.Identity.generate()
    secret = str(identity)
    for value in (secret, f"{identity.to_public()},{secret}"):
        with pytest.raises(ConfigError) as caught:
            crypto.Recipients.parse(value)
        assert "private key" in str(caught.value) and secret not in str(caught.value)
    listing = tmp_path / "r.txt"
    listing.write_text(secret + "\n")
    with pytest.raises(ConfigError) as caught:
        crypto.Recipients.parse(str(listing))
    assert secret not in str(caught.value)


def test_a_missing_recipients_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipients\.txt cannot be read"):
        crypto.Recipients.parse(str(tmp_path / "recipients.txt"))


def test_identity_files(tmp_path: Path) -> None:
    """age-keygen's file loads (comments skipped); a bad line, a missing file and an encrypted
    identity are IdentityErrors that never quote the file."""
    path, public = _key(tmp_path)
    identity = crypto.Identity.load(path)
    assert list(identity.fingerprints) == [crypto.Recipients.parse(public).keys[0].fingerprint]
    bad = tmp_path / "bad.txt"
    bad.write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    with pytest.raises(IdentityError, match="line 1 is not an age secret key") as caught:
        crypto.Identity.load(bad)
    assert "NOTAKEY" not in str(caught.value)
    with pytest.raises(IdentityError, match="cannot be read"):
        crypto.Identity.load(tmp_path / "missing.txt")
    wrapped = tmp_path / "wrapped.age"
    wrapped.write_bytes(pyrage.passphrase.encrypt(path.read_bytes(), "pw"))
    with pytest.raises(IdentityError, match="passphrase-protected identities"):
        crypto.Identity.load(wrapped)


@pytest.mark.parametrize("size", [0, 1, 64 * 1024, 64 * 1024 + 1, 3 * 64 * 1024 + 7])
def test_a_stream_round_trips_and_its_length_is_one_age_makes(size: int, tmp_path: Path) -> None:
    """encrypt_stream then decrypt_stream gives the bytes back; the ciphertext's payload length
    maps back to the plaintext size (what verification without the key checks)."""
    path, public = _key(tmp_path)
    data = os.urandom(size)
    sealed = _encrypt(data, crypto.Recipients.parse(public))
    shape = crypto.AgeShape()
    shape.feed(sealed)
    kinds, _, header = shape.header()
    assert kinds == ["x25519"]
    assert crypto.payload_plain_size(len(sealed) - header) == size
    assert "1 recipients" in shape.check([{"type": "x25519", "fingerprint": "x"}])
    out = io.BytesIO()
    crypto.decrypt_stream(io.BytesIO(sealed).read, out.write, crypto.Identity.load(path))
    assert out.getvalue() == data


def test_decryption_errors_say_what_happened(tmp_path: Path) -> None:
    """Wrong key: IdentityError naming the identity file; a cut or changed file:
    VerificationError (check ``decryption``); an error of the sink is raised as it is."""
    path, public = _key(tmp_path, "right")
    other, _ = _key(tmp_path, "other")
    sealed = _encrypt(os.urandom(200_000), crypto.Recipients.parse(public))
    with pytest.raises(IdentityError, match=r"other\.txt"):
        crypto.decrypt_stream(io.BytesIO(sealed).read, len, crypto.Identity.load(other))
    identity = crypto.Identity.load(path)
    for damaged in (sealed[:-1], sealed[:-100], sealed[: len(sealed) // 2]):
        with pytest.raises(VerificationError) as caught:
            crypto.decrypt_stream(io.BytesIO(damaged).read, len, identity)
        assert caught.value.check == "decryption"
    changed = bytearray(sealed)
    changed[-50] ^= 1
    with pytest.raises(VerificationError):
        crypto.decrypt_stream(io.BytesIO(bytes(changed)).read, len, identity)

    class Full(Exception):
        pass

    def full(data: bytes) -> None:
        raise Full

    with pytest.raises(Full):
        crypto.decrypt_stream(io.BytesIO(sealed).read, full, identity)


def test_the_decrypting_reader_reads_and_stops(tmp_path: Path) -> None:
    """DecryptingReader gives the plaintext as read(n) and can be closed half way."""
    path, public = _key(tmp_path)
    data = os.urandom(1_000_000)
    sealed = _encrypt(data, crypto.Recipients.parse(public))
    identity = crypto.Identity.load(path)
    with crypto.DecryptingReader(io.BytesIO(sealed).read, identity) as reader:
        got = b"".join(iter(lambda: reader.read(10_000), b""))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    reader = crypto.DecryptingReader(io.BytesIO(sealed).read, identity, depth=1)
    assert len(reader.read(100)) == 100
    reader.close()  # the thread stops though it had more to give
    with (
        crypto.DecryptingReader(io.BytesIO(sealed[:-5]).read, identity) as cut,
        pytest.raises(VerificationError),
    ):
        while cut.read(65536):
            pass


def test_the_header_tells_the_recipients_without_the_key(tmp_path: Path) -> None:
    """Without the key: a header naming other recipients than the manifest's, a file that is
    not age, or an impossible length fail the ``encryption`` check."""
    _, a = _key(tmp_path, "a")
    _, b = _key(tmp_path, "b")
    sealed = _encrypt(b"x" * 1000, crypto.Recipients.parse(f"{a},{b}"))
    shape = crypto.AgeShape()
    shape.feed(sealed)
    with pytest.raises(VerificationError, match="names recipients"):
        shape.check([{"type": "x25519", "fingerprint": "x"}])
    not_age = crypto.AgeShape()
    not_age.feed(b"PGDMP" + b"\0" * 100)
    with pytest.raises(VerificationError, match="age header"):
        not_age.check(None)
    assert crypto.payload_plain_size(16 + 10) is None
    assert crypto.payload_plain_size(16 + 16 + 65536 + 3) is None  # a second chunk of 3 bytes


def test_encrypting_a_large_stream_keeps_memory_flat() -> None:
    """512 MiB through encrypt_stream in a fresh interpreter: the peak RSS grows by a few MB
    at most (a chunk or two), not with the data, so pyrage really streams."""
    script = textwrap.dedent(
        """
        import resource, os
        from pyrage import x25519
        from pgkeeper import crypto
        key = x25519.Identity.generate().to_public()
        recipients = crypto.Recipients.parse(str(key))
        block, left = os.urandom(1 << 20), 512
        warm = iter([b"warm up", b""])
        crypto.encrypt_stream(lambda n: next(warm), len, recipients)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def read(n):
            global left
            if left == 0:
                return b""
            left -= 1
            return block
        written = crypto.encrypt_stream(read, len, recipients)
        assert written > 512 << 20
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    growth_mb = int(out.stdout.strip())
    assert growth_mb < 16, growth_mb
