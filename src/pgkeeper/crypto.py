"""Encryption at rest with age (pyrage: bindings to rage, the Rust age implementation).

The backup host needs only public keys (``BACKUP_ENCRYPTION_RECIPIENTS``); only the restore side
holds a private key (``BACKUP_ENCRYPTION_IDENTITY_FILE`` or ``--identity FILE``). No cryptography
is written here: age does it all (X25519 / ssh-ed25519 / ssh-rsa wrapping of a random file key,
ChaCha20-Poly1305 in 64 KiB chunks, each authenticated, the last one marked so a cut file
fails). This module parses keys, computes fingerprints for manifests, and adapts pyrage's
file-like streaming calls to pgkeeper's ``read(n)`` / ``write(data)`` callables.

    Recipients.parse(value)        public keys, inline (comma or newline separated) or a file
    Identity.load(path)            age secret keys, or one unencrypted OpenSSH private key
    encrypt_stream(read, write, r) the one call that encrypts any stream (backups, WAL, ...)
    decrypt_stream(read, write, i)
    DecryptingReader(read, i)      the plaintext as a ``read(n)`` (decrypts in its own thread)
    AgeShape                       what can be checked without the identity: header and length

Measured (1 GiB through ``encrypt_stream``): peak RSS 15 MB whatever the size; pyrage reads
its input 8 KiB at a time and writes 64 KiB + 16 byte chunks, so memory is bounded by a chunk.
pyrage holds the GIL while it encrypts a chunk; the callables it calls release it for I/O.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgkeeper import naming
from pgkeeper.errors import ConfigError, IdentityError, PgkeeperError, VerificationError
from pgkeeper.manifest import Encryption

if TYPE_CHECKING:
    from pgkeeper.manifest import Manifest
    from pgkeeper.settings import Settings
    from pgkeeper.storage import Storage

AGE_MAGIC = b"age-encryption.org/v1\n"
AGE_ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
SUFFIX = ".age"
CHUNK_SIZE = 64 * 1024  # age's STREAM: plaintext chunks of 64 KiB ...
TAG_SIZE = 16  # ... each followed by a 16-byte Poly1305 tag
NONCE_SIZE = 16  # the payload starts with a 16-byte nonce
MAX_HEADER = 64 * 1024  # far more than any header of a handful of recipients needs

# Stanza types of the recipients pgkeeper accepts; anything else in a header is grease
# (random stanzas age adds on purpose) or a recipient kind pgkeeper does not write.
STANZA_TYPES = {"X25519": "x25519", "ssh-ed25519": "ssh-ed25519", "ssh-rsa": "ssh-rsa"}
_SSH_TYPES = ("ssh-ed25519", "ssh-rsa")


def _pyrage() -> Any:
    import pyrage  # imported lazily: commands that never touch an encrypted backup skip it

    return pyrage


def is_encrypted(head: bytes) -> bool:
    """True when ``head`` starts an age file (binary or ASCII-armored)."""
    return head.startswith(AGE_MAGIC) or head.lstrip().startswith(AGE_ARMOR)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


# --- recipients: public keys, for the backup host --------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """One public key: its kind, its fingerprint (what manifests record) and the key itself."""

    kind: str  # x25519 | ssh-ed25519 | ssh-rsa
    fingerprint: str  # SHA256:<base64>, as ``ssh-keygen -l`` prints for ssh keys
    text: str = field(repr=False)

    @classmethod
    def parse(cls, text: str, where: str) -> Recipient:
        """One public key; raise ConfigError naming ``where`` (never echoing a secret)."""
        pyrage = _pyrage()
        if text.upper().startswith(("AGE-SECRET-KEY-", "AGE-PLUGIN-")) or "PRIVATE KEY" in text:
            raise ConfigError(
                f"{where} is a private key: BACKUP_ENCRYPTION_RECIPIENTS takes public keys only "
                "(age-keygen -y KEYFILE prints an age key's public key); keep the private key "
                "off the backup host"
            )
        shown = text[:24] + ("..." if len(text) > 24 else "")
        if text.startswith("age1"):
            try:
                pyrage.x25519.Recipient.from_str(text)
            except pyrage.RecipientError as exc:
                raise ConfigError(
                    f"{where} ({shown!r}) is not a valid age public key ({exc}; age plugin "
                    "keys such as age1yubikey... are not supported)"
                ) from None
            return cls("x25519", "SHA256:" + _b64(hashlib.sha256(text.encode()).digest()), text)
        parts = text.split()
        if len(parts) >= 2 and parts[0] in _SSH_TYPES:
            try:
                pyrage.ssh.Recipient.from_str(" ".join(parts[:2]))
                blob = base64.b64decode(parts[1], validate=True)
            except (pyrage.RecipientError, ValueError) as exc:
                raise ConfigError(
                    f"{where} ({shown!r}) is not a valid {parts[0]} public key ({exc})"
                ) from None
            return cls(parts[0], ssh_fingerprint(blob), " ".join(parts[:2]))
        raise ConfigError(
            f"{where} ({shown!r}) is not a public key pgkeeper can encrypt to (use age1..., "
            "ssh-ed25519 AAAA... or ssh-rsa AAAA... public keys)"
        )


def ssh_fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob (what ``ssh-keygen -l`` prints)."""
    return "SHA256:" + _b64(hashlib.sha256(blob).digest())


@dataclass(frozen=True)
class Recipients:
    """The public keys new backups are encrypted to (BACKUP_ENCRYPTION_RECIPIENTS)."""

    keys: tuple[Recipient, ...]

    @classmethod
    def parse(cls, value: str) -> Recipients:
        """Public keys inline (``age1...``/``ssh-...`` separated by commas or newlines) or the
        path of a file of them, one per line, ``#`` comments allowed (age's ``-R`` format).

        Raises ConfigError for an unreadable file, an empty list, a private key or a key
        pgkeeper cannot encrypt to.
        """
        text = value.strip()
        origin = "BACKUP_ENCRYPTION_RECIPIENTS"
        inline = text.upper().startswith(("AGE", "SSH-", "#")) or "PRIVATE KEY" in text
        if not inline and not any(sep in text for sep in " ,\n"):
            path = Path(text).expanduser()
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    f"BACKUP_ENCRYPTION_RECIPIENTS file {path} cannot be read ({reason}): give "
                    "public keys (age1..., ssh-ed25519 ...) or the path of a file of them"
                ) from None
            origin = f"BACKUP_ENCRYPTION_RECIPIENTS file {path}"
        entries = [
            line.strip()
            for line in re.split(r"[,\n]", text)
            if line.strip() and not line.strip().startswith("#")
        ]
        if not entries:
            raise ConfigError(f"{origin} holds no public key (add age1... or ssh-... keys)")
        keys = tuple(Recipient.parse(e, f"{origin} entry {n}") for n, e in enumerate(entries, 1))
        return cls(keys)

    def fingerprints(self) -> list[dict[str, str]]:
        """What a manifest records: each key's kind and fingerprint, never the key."""
        return [{"type": k.kind, "fingerprint": k.fingerprint} for k in self.keys]

    def pyrage(self) -> list[Any]:
        pyrage = _pyrage()
        return [
            pyrage.x25519.Recipient.from_str(k.text)
            if k.kind == "x25519"
            else pyrage.ssh.Recipient.from_str(k.text)
            for k in self.keys
        ]


# --- identities: private keys, for the restore side -------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Private keys read from one identity file; ``repr`` and messages show only the path and
    the public fingerprints."""

    path: Path
    keys: tuple[Any, ...] = field(repr=False)
    fingerprints: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read an identity file: age secret keys (``AGE-SECRET-KEY-1...`` lines, as
        ``age-keygen`` writes) or one unencrypted OpenSSH private key.

        Raises IdentityError for a missing or unreadable file, a passphrase-protected key or a
        line that is no key (never quoting the file's contents).
        """
        pyrage = _pyrage()
        path = Path(path).expanduser()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise IdentityError(
                f"identity file {path} cannot be read ({exc.strerror}; set "
                "BACKUP_ENCRYPTION_IDENTITY_FILE or --identity to the private key file)"
            ) from None
        if is_encrypted(raw):
            raise IdentityError(
                f"identity file {path} is itself age-encrypted (passphrase-protected identities "
                "are not supported: decrypt it to a private file first, e.g. with age -d)"
            )
        if b"PRIVATE KEY-----" in raw:
            try:
                key = pyrage.ssh.Identity.from_buffer(raw)
            except pyrage.IdentityError as exc:
                raise IdentityError(
                    f"identity file {path} holds an ssh private key pgkeeper cannot use ({exc}; "
                    "a passphrase-protected key must be decrypted first: ssh-keygen -p)"
                ) from None
            blob = _openssh_public_blob(raw)
            prints = (ssh_fingerprint(blob),) if blob else ()
            return cls(path, (key,), prints)
        keys: list[Any] = []
        prints_list: list[str] = []
        text = raw.decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = pyrage.x25519.Identity.from_str(line)
            except pyrage.IdentityError:
                raise IdentityError(
                    f"identity file {path} line {number} is not an age secret key "
                    "(AGE-SECRET-KEY-1...) and the file is no OpenSSH private key"
                ) from None
            keys.append(key)
            public = str(key.to_public())
            prints_list.append("SHA256:" + _b64(hashlib.sha256(public.encode()).digest()))
        if not keys:
            raise IdentityError(f"identity file {path} holds no private key")
        return cls(path, tuple(keys), tuple(prints_list))

    def describe(self) -> str:
        return f"{self.path}" + (f" ({', '.join(self.fingerprints)})" if self.fingerprints else "")


def _openssh_public_blob(raw: bytes) -> bytes | None:
    """The public key blob an ``openssh-key-v1`` private key file carries in the clear (its
    first public key), for the fingerprint in messages; None for other layouts."""
    text = raw.decode("ascii", "replace")
    match = re.search(
        r"-----BEGIN OPENSSH PRIVATE KEY-----(.*?)-----END OPENSSH PRIVATE KEY-----", text, re.S
    )
    if match is None:
        return None
    try:
        data = base64.b64decode("".join(match.group(1).split()))
        magic = b"openssh-key-v1\0"
        if not data.startswith(magic):
            return None
        pos = len(magic)
        for _ in range(3):  # cipher name, kdf name, kdf options
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            pos += 4 + length
        pos += 4  # number of keys
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        return data[pos + 4 : pos + 4 + length]
    except (ValueError, struct.error):
        return None


# --- streaming ----------------------------------------------------------------------------------


class _Source:
    """A read-only file-like object for pyrage over a ``read(n)`` callable.

    pyrage asks for 8 KiB at a time and must never be given more than it asked for. An
    exception of ``read`` is kept, so the caller re-raises it (pyrage wraps it in its own).
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._pending = b""
        self._pos = 0
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            if self._pos >= len(self._pending):
                self._pending = self._read(max(n, 1 << 20))
                self._pos = 0
            size = n if n >= 0 else len(self._pending)
            data = self._pending[self._pos : self._pos + size]
            self._pos += len(data)
            return data
        except BaseException as exc:
            self.error = exc
            raise


class _Sink:
    """A write-only file-like object for pyrage over a ``write(data)`` callable.

    pyrage hands its output over 8 KiB at a time when decrypting: pieces are gathered and
    passed on in blocks of ``batch`` bytes, one call of the consumer (a queue hand-off, a
    decompressor) per 256 KiB instead of 32. ``finish()`` passes on the rest once pyrage is
    done.
    """

    def __init__(self, write: Callable[[bytes], object], batch: int = 256 * 1024) -> None:
        self._write = write
        self._batch = batch
        self._pending: list[bytes] = []
        self._size = 0
        self.written = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        self._pending.append(bytes(data))
        self._size += len(data)
        self.written += len(data)
        if self._size >= self._batch:
            self._pass_on()
        return len(data)

    def _pass_on(self) -> None:
        block = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._size = [], 0
        try:
            self._write(block)
        except BaseException as exc:
            self.error = exc
            raise

    def finish(self) -> None:
        if self._pending:
            self._pass_on()

    def flush(self) -> None:
        return None


def blocks_reader(blocks: Iterable[bytes]) -> Callable[[int], bytes]:
    """A ``read(n)`` over an iterable of byte blocks (e.g. a compressor's output)."""
    iterator: Iterator[bytes] = iter(blocks)

    def read(n: int) -> bytes:
        for block in iterator:
            if block:
                return block
        return b""

    return read


def encrypt_stream(
    read: Callable[[int], bytes], write: Callable[[bytes], object], recipients: Recipients
) -> int:
    """Encrypt everything ``read`` returns (until b"") to ``recipients``, handing the age file
    to ``write`` in 64 KiB pieces; return the bytes written. Memory stays bounded (a chunk).

    This is the one function to call to encrypt a stream (backups, imports, rekey, WAL).
    Raises whatever ``read`` or ``write`` raised, else PgkeeperError when age fails.
    """
    pyrage = _pyrage()
    source, sink = _Source(read), _Sink(write)
    try:
        pyrage.encrypt_io(source, sink, recipients.pyrage())
    except Exception as exc:
        for error in (source.error, sink.error):
            if error is not None:
                raise error from None
        raise PgkeeperError(f"age encryption failed: {exc}") from None
    for error in (source.error, sink.error):  # pyrage flushes its last piece while dropping
        if error is not None:
            raise error
    sink.finish()
    return sink.written


def decrypt_stream(
    read: Callable[[int], bytes], write: Callable[[bytes], object], identity: Identity
) -> int:
    """Decrypt the age file ``read`` returns, handing the plaintext to ``write``; return the
    plaintext bytes.

    Raises IdentityError when no key of ``identity`` opens the file (before any plaintext),
    VerificationError (check ``decryption``) when the file is damaged or cut short (every chunk
    is authenticated, and the last one is marked), else what ``read``/``write`` raised.
    """
    pyrage = _pyrage()
    source, sink = _Source(read), _Sink(write)
    try:
        pyrage.decrypt_io(source, sink, list(identity.keys))
    except Exception as exc:
        for error in (source.error, sink.error):
            if error is not None:
                raise error from None
        if isinstance(exc, pyrage.DecryptError) and "no matching keys" in str(exc).lower():
            raise IdentityError(
                f"the identity {identity.describe()} cannot decrypt this backup: none of its "
                "keys is a recipient (use the private key of one of the backup's recipients)"
            ) from None
        what = "its age header is damaged" if sink.written == 0 else "a chunk does not decrypt"
        raise VerificationError(
            f"the age file does not decrypt: {what} ({exc}; the file is damaged or cut short)",
            check="decryption",
        ) from None
    for error in (source.error, sink.error):
        if error is not None:
            raise error
    sink.finish()
    return sink.written


_END = object()


class _Stop(Exception):
    """The consumer of a DecryptingReader went away: stop decrypting."""


class DecryptingReader:
    """``read(n)`` of the plaintext of the age file ``read`` returns.

    Decryption runs in a thread of its own (pyrage pulls its input and pushes its output), with
    at most ``depth`` chunks of 64 KiB waiting; ``read`` re-raises what decryption raised
    (IdentityError, VerificationError, or the source's error). Use as a context manager, or call
    ``close()``: it stops the thread (without reading the rest of the source).
    """

    def __init__(self, read: Callable[[int], bytes], identity: Identity, depth: int = 16) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._pending = b""
        self._pos = 0
        self._done = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(read, identity), daemon=True, name="pgkeeper-decrypt"
        )
        self._thread.start()

    def _run(self, read: Callable[[int], bytes], identity: Identity) -> None:
        try:
            decrypt_stream(read, self._put, identity)
        except _Stop:
            pass
        except BaseException as exc:  # handed to the reader
            self.error = exc
        finally:
            self._put_end()

    def _put(self, data: bytes) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(data, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def _put_end(self) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(_END, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._pending):
            if self._done:
                return b""
            item = self._queue.get()
            if item is _END:
                self._done = True
                if self.error is not None:
                    raise self.error
                return b""
            assert isinstance(item, bytes)  # noqa: S101 - only bytes and _END are queued
            self._pending, self._pos = item, 0
        size = n if n >= 0 else len(self._pending) - self._pos
        data = self._pending[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()

    def __enter__(self) -> DecryptingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- without the identity: what the header and the length can tell -----------------------------


def payload_plain_size(payload: int) -> int | None:
    """The plaintext size an age payload of ``payload`` bytes (nonce included) holds, or None
    when no plaintext gives that length (the file was cut or padded)."""
    body = payload - NONCE_SIZE
    if body < TAG_SIZE:
        return None
    chunks = -(-body // (CHUNK_SIZE + TAG_SIZE))
    plain = body - chunks * TAG_SIZE
    if plain < 0 or plain > chunks * CHUNK_SIZE:
        return None
    if chunks > 1 and plain <= (chunks - 1) * CHUNK_SIZE:
        return None
    return plain


class AgeShape:
    """Follows a stored age file's bytes without the identity: the header's form, its
    recipient stanzas, and whether the payload's length is one age can produce."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.size = 0

    def feed(self, data: bytes) -> None:
        if len(self._head) < MAX_HEADER:
            self._head += data[: MAX_HEADER - len(self._head)]
        self.size += len(data)

    def header(self) -> tuple[list[str], list[str], int]:
        """(recipient kinds, ssh key tags, header length); raise VerificationError."""
        head = bytes(self._head)
        if not head.startswith(AGE_MAGIC):
            raise VerificationError("it does not start with an age header", check="encryption")
        end = head.find(b"\n--- ")
        newline = head.find(b"\n", end + 1) if end >= 0 else -1
        if end < 0 or newline < 0:
            raise VerificationError("its age header has no end (cut short?)", check="encryption")
        kinds: list[str] = []
        tags: list[str] = []
        for line in head[len(AGE_MAGIC) : end + 1].split(b"\n"):
            if line.startswith(b"-> "):
                args = line[3:].decode("ascii", "replace").split()
                if args and args[0] in STANZA_TYPES:
                    kinds.append(STANZA_TYPES[args[0]])
                    if args[0] in _SSH_TYPES and len(args) > 1:
                        tags.append(args[1])
        return kinds, tags, newline + 1

    def check(self, recorded: list[dict[str, str]] | None) -> str:
        """Judge the whole file; return what was checked; raise VerificationError (check
        ``encryption``) when the header or the length is wrong, or the header's recipients are
        not the ones ``recorded`` in the manifest (their count and kinds; ssh keys by tag)."""
        kinds, tags, length = self.header()
        plain = payload_plain_size(self.size - length)
        if plain is None:
            raise VerificationError(
                f"its length ({self.size} bytes) is not one an age file can have: it was cut "
                "short or has bytes appended",
                check="encryption",
            )
        if recorded is not None:
            expected = sorted(r["type"] for r in recorded)
            if sorted(kinds) != expected:
                raise VerificationError(
                    f"its age header names recipients {sorted(kinds)}, the manifest {expected}",
                    check="encryption",
                )
            prints = {r["fingerprint"] for r in recorded if r["type"] in _SSH_TYPES}
            for tag in tags:
                if not any(_b64(_unb64(p)[:4]) == tag for p in prints):
                    raise VerificationError(
                        "its age header names an ssh key the manifest does not", check="encryption"
                    )
        return f"age header ({len(kinds)} recipients), length of {plain} plaintext bytes"


def _unb64(fingerprint: str) -> bytes:
    text = fingerprint.removeprefix("SHA256:")
    return base64.b64decode(text + "=" * (-len(text) % 4))


# --- settings and backups ---------------------------------------------------------------------


def recipients_of(settings: Settings) -> Recipients | None:
    """The recipients new backups are encrypted to, or None when encryption is off.
    Raises ConfigError for a bad BACKUP_ENCRYPTION_RECIPIENTS."""
    value = settings.backup_encryption_recipients
    if value is None or not value.strip():
        return None
    return Recipients.parse(value)


def encryption_record(recipients: Recipients | None) -> Encryption | None:
    """The manifest's ``encryption`` for a backup encrypted to ``recipients`` (None: plain)."""
    return None if recipients is None else Encryption(recipients=recipients.fingerprints())


def configured_identity(settings: Settings) -> Identity | None:
    """The identity BACKUP_ENCRYPTION_IDENTITY_FILE (or --identity) names, loaded; None when
    unset. Raises IdentityError when the file cannot be used."""
    path = settings.backup_encryption_identity_file
    return None if path is None else Identity.load(path)


def identity_loader(settings: Settings) -> Callable[[], Identity | None]:
    """``configured_identity`` deferred to its first call (then kept): for readers that may
    meet no encrypted file at all, such as a restore_command replaying unencrypted WAL, which
    must not fail over a key file it never needed."""
    loaded: list[Identity | None] = []
    lock = threading.Lock()

    def load() -> Identity | None:
        with lock:
            if not loaded:
                loaded.append(configured_identity(settings))
            return loaded[0]

    return load


def identity_for(settings: Settings, manifest: Manifest, what: str) -> Identity | None:
    """None for a backup that is not encrypted; else the configured identity, or IdentityError
    saying that ``what`` (e.g. 'restoring it') needs one."""
    if manifest.encryption is None:
        return None
    identity = configured_identity(settings)
    if identity is None:
        raise IdentityError(
            f"backup {manifest.id!r} is encrypted (age): {what} needs its private key (set "
            "BACKUP_ENCRYPTION_IDENTITY_FILE or pass --identity FILE)"
        )
    return identity


class _Opened(Exception):
    """The first plaintext arrived: the identity opens the file."""


def check_identity(storage: Storage, manifest: Manifest, identity: Identity) -> None:
    """Prove ``identity`` opens the backup before anything is changed: decrypt the header and
    the first chunk of its first object (a directory backup's ``toc.dat``), then stop.

    Raises IdentityError when no key of the identity is a recipient; VerificationError when the
    object's header is damaged; StorageError when it cannot be read.
    """
    names = [o.name for o in manifest.objects]
    first = next((n for n in names if n.endswith("/toc.dat" + SUFFIX)), names[0])

    def opened(data: bytes) -> None:
        raise _Opened

    with storage.open_read(naming.object_key(manifest.id, first)) as src:
        try:
            decrypt_stream(src.read, opened, identity)
        except _Opened:
            return
        except IdentityError as exc:
            recorded = manifest.encryption.recipients if manifest.encryption else []
            shown = ", ".join(r.get("fingerprint", "?") for r in recorded)
            hint = f" (it was encrypted to {shown})" if shown else ""
            raise IdentityError(f"backup {manifest.id!r}: {exc}{hint}") from None
