"""The roles a custom or directory backup names, read from its table of contents alone.

A database's backup names roles by name: every object's owner, and the grantees and grantors
of its privileges. Roles belong to the server, so a server the backup is restored onto (a
staging server above all, which is not a copy of production) may lack some, and pg_restore
then stops at ``role "x" does not exist``. Restore tests ask before they restore
(restore_test.py), by what pg_restore would do with each role:

  owners      ``ALTER ... OWNER TO``: the last field of each ``pg_restore --list`` line (ACL
              lines aside: theirs is the object's owner, which its own line names); left out
              by ``--no-owner``
  privileges  the grantees, grantors (``SET SESSION AUTHORIZATION``) and ``FOR ROLE`` of the
              ACL and DEFAULT ACL entries, from their SQL; left out by ``--no-privileges``
  others      the roles of ``CREATE POLICY ... TO`` and ``CREATE USER MAPPING FOR``, which
              neither option leaves out

Only the table of contents is read: a custom archive's head (``loader.capture_head``: the
stream's first bytes up to the end of its table of contents, decrypted for an encrypted
backup), a directory's ``toc.dat``; ``pg_restore -L <those entries> -f -`` writes their SQL
from the table of contents, without touching any data. These bytes are not checked against
the manifest here: the restore that follows checks every stored byte.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from pgkeeper import crypto, loader, naming, postgres, sqltext
from pgkeeper.errors import IdentityError, PgkeeperError, RestoreError
from pgkeeper.manifest import Manifest
from pgkeeper.pipeline import ClientProcess, HashingReader, decode_verified
from pgkeeper.settings import Settings
from pgkeeper.sqltext import Statement
from pgkeeper.storage import Storage

log = logging.getLogger(__name__)

# "3358; 0 0 ACL shop TABLE t shop_app": dump id, catalog ids, then desc, schema, tag, owner.
_ENTRY = re.compile(r"^\d+; \d+ \d+ (.*)$")
_PRIVILEGE_KINDS = ("ACL ", "DEFAULT ACL ")
_OTHER_KINDS = ("POLICY ", "USER MAPPING ")
_OWN_LINES = re.compile(rb"^\\(?:connect|restrict|unrestrict)\b[^\n]*$", re.M)


@dataclass(frozen=True)
class RoleGaps:
    """The roles of a backup that a server lacks, by what restoring them would need."""

    owners: list[str] = field(default_factory=list)  # --no-owner leaves them out
    privileges: list[str] = field(default_factory=list)  # --no-privileges leaves them out
    others: dict[str, str] = field(default_factory=dict)  # role -> the entry naming it

    @property
    def roles(self) -> list[str]:
        """Every missing role, sorted."""
        return sorted({*self.owners, *self.privileges, *self.others})

    def __bool__(self) -> bool:
        return bool(self.owners or self.privileges or self.others)


@dataclass(frozen=True)
class ArchiveRoles:
    """What a backup's table of contents says about roles (see the module docstring)."""

    owner_entries: tuple[str, ...] = ()  # listing lines after the ids: "TABLE shop t shop_app"
    privileges: frozenset[str] = frozenset()
    others: dict[str, str] = field(default_factory=dict)

    def missing_on(self, existing: Iterable[str]) -> RoleGaps:
        """The roles a server with roles ``existing`` lacks."""
        have = set(existing)
        spaced = [r for r in have if " " in r]  # the listing does not quote an owner's name
        owners: set[str] = set()
        for entry in self.owner_entries:
            owner = entry.rsplit(" ", 1)[-1]
            if not owner or owner in have or any(entry.endswith(f" {r}") for r in spaced):
                continue
            owners.add(owner)
        return RoleGaps(
            owners=sorted(owners),
            privileges=sorted(self.privileges - have),
            others={r: what for r, what in sorted(self.others.items()) if r not in have},
        )


# --- reading the table of contents ---------------------------------------------------------


def read_roles(
    settings: Settings,
    manifest: Manifest,
    storage: Storage,
    identity: crypto.Identity | None = None,
) -> ArchiveRoles | None:
    """The roles a custom or directory backup names; None for a plain or tar one (no table of
    contents to read first) or when the table of contents cannot be read (logged: the restore
    that follows then meets the problem itself and reports it).

    ``identity`` opens an encrypted backup (the caller has it: a restore needs it anyway);
    raises IdentityError when it does not.
    """
    if manifest.format not in ("custom", "directory"):
        return None
    pg_restore = postgres.find_client("pg_restore", settings.pg_bin_dir).argv0
    try:
        with tempfile.TemporaryDirectory(prefix="pgkeeper-roles-") as tmp:
            archive = _stage_toc(manifest, storage, Path(tmp), pg_restore, identity)
            return roles_of_archive(pg_restore, archive, Path(tmp))
    except IdentityError:
        raise  # the key does not open it: the restore would stop there too
    except (PgkeeperError, OSError) as exc:
        log.warning(
            "the roles backup %s names could not be read from its table of contents (%s): "
            "restoring it as it is", manifest.id, exc,
        )  # fmt: skip
        return None


def roles_of_archive(pg_restore: str, archive: Path, tmp: Path) -> ArchiveRoles:
    """The roles a local archive (file, truncated head, or directory) names. Raises
    RestoreError when pg_restore cannot read its table of contents."""
    listing = _output([pg_restore, "--list", str(archive)]).decode("utf-8", "replace")
    owner_entries: list[str] = []
    chosen: list[str] = []
    for line in listing.splitlines():
        match = _ENTRY.match(line)
        if match is None:
            continue
        entry = match.group(1)
        if entry.startswith(_PRIVILEGE_KINDS):
            chosen.append(line)
            continue
        if entry.startswith(_OTHER_KINDS):
            chosen.append(line)
        owner_entries.append(entry)
    privileges: set[str] = set()
    others: dict[str, str] = {}
    if chosen:
        selection = tmp / "roles.list"
        selection.write_text("".join(f"{line}\n" for line in chosen), "utf-8")
        output = _output([pg_restore, f"--use-list={selection}", "--file=-", str(archive)])
        text, _ = sqltext.decode(_OWN_LINES.sub(b"", output))
        privileges, others = roles_in_sql(sqltext.split_statements(text))
    return ArchiveRoles(tuple(owner_entries), frozenset(privileges), others)


def _stage_toc(
    manifest: Manifest,
    storage: Storage,
    tmp: Path,
    pg_restore: str,
    identity: crypto.Identity | None,
) -> Path:
    """A local archive pg_restore can read the table of contents of: the stored file or
    folder when it is local and readable as is, else the head of a custom archive or the
    ``toc.dat`` of a directory one, decrypted when ``identity`` is given, in ``tmp``."""
    encrypted = manifest.encryption is not None
    if manifest.format == "custom":
        obj = manifest.objects[0]
        key = naming.object_key(manifest.id, obj.name)
        local = storage.local_path(key)
        if manifest.compression == "none" and not encrypted and local and local.is_file():
            return local
        head = tmp / "head.dump"
        with ExitStack() as stack:
            src: loader.Readable = stack.enter_context(storage.open_read(key))
            if encrypted:
                if identity is None:
                    raise RestoreError("the backup is encrypted and no identity was given")
                src = stack.enter_context(crypto.DecryptingReader(src.read, identity))
            loader.capture_head(src, manifest.compression, head, pg_restore, dict(os.environ))
        return head
    folder = naming.data_name(manifest.id, manifest.format, manifest.compression)
    local = storage.local_path(naming.object_key(manifest.id, folder))
    if not encrypted and local is not None and local.is_dir():
        return local
    toc_name = f"{folder}/toc.dat" + (crypto.SUFFIX if encrypted else "")
    toc = next((o for o in manifest.objects if o.name == toc_name), None)
    if toc is None:
        raise RestoreError(f"the backup has no {toc_name} in its manifest")
    if encrypted and identity is None:
        raise RestoreError("the backup is encrypted and no identity was given")
    (tmp / "dir").mkdir()
    with (
        storage.open_read(naming.object_key(manifest.id, toc.name)) as src_file,
        open(tmp / "dir" / "toc.dat", "wb") as out,
    ):
        decode_verified(HashingReader.of(src_file, toc), "none", out.write, identity)
    return tmp / "dir"


def _output(argv: list[str]) -> bytes:
    """pg_restore reading a local archive (it connects to no server)."""
    with tempfile.TemporaryFile() as out:
        with ClientProcess(argv, dict(os.environ), stdout=out, stdin=subprocess.DEVNULL) as proc:
            if proc.wait() != 0:
                raise RestoreError(f"pg_restore failed: {proc.last_error()}")
        out.seek(0)
        return out.read()


# --- the roles in SQL ------------------------------------------------------------------------


def roles_in_sql(statements: Iterable[Statement]) -> tuple[set[str], dict[str, str]]:
    """The roles pg_dump's ACL, DEFAULT ACL, POLICY and USER MAPPING statements name:
    (the privilege statements' roles, {role: the statement naming it} for the others).
    PUBLIC is everyone, no role."""
    privileges: set[str] = set()
    others: dict[str, str] = {}
    for stmt in statements:
        if stmt.is_(0, "GRANT", "REVOKE"):
            privileges.update(_grant_roles(stmt, 0))
        elif stmt.is_(0, "SET") and stmt.is_(1, "SESSION") and stmt.is_(2, "AUTHORIZATION"):
            privileges.update(_roles(stmt, 3, ("DEFAULT",))[0])
        elif stmt.is_(0, "ALTER") and stmt.is_(1, "DEFAULT") and stmt.is_(2, "PRIVILEGES"):
            at = 3
            if stmt.is_(3, "FOR") and stmt.is_(4, "ROLE", "USER"):
                roles, at = _roles(stmt, 5, ("IN", "GRANT", "REVOKE"))
                privileges.update(roles)
            verb = next((i for i in range(at, len(stmt.words)) if stmt.is_(i, "GRANT", "REVOKE")),
                        None)  # fmt: skip
            if verb is not None:
                privileges.update(_grant_roles(stmt, verb))
        elif stmt.is_(0, "CREATE") and stmt.is_(1, "POLICY") and len(stmt.words) > 2:
            for role in _policy_roles(stmt):
                others.setdefault(role, f"policy {stmt.name(2)}")
        elif (
            stmt.is_(0, "CREATE") and stmt.is_(1, "USER") and stmt.is_(2, "MAPPING")
            and stmt.is_(3, "FOR") and not stmt.is_(4, "USER")  # FOR USER: the session's
        ):  # fmt: skip
            roles, at = _roles(stmt, 4, ("SERVER",))
            server = stmt.name(at + 1) if at + 1 < len(stmt.words) else "?"
            for role in roles:
                others.setdefault(role, f"a user mapping for server {server}")
    return privileges, others


# Words that stand for no role of the server: everyone, the session's own, GROUP of old dumps.
_NOT_ROLES = ("PUBLIC", "GROUP", "CURRENT_USER", "CURRENT_ROLE", "SESSION_USER")


def _roles(stmt: Statement, i: int, stop: tuple[str, ...]) -> tuple[list[str], int]:
    """A comma list of role names from token ``i`` up to a ``stop`` keyword or the end, and
    where it stopped."""
    found: list[str] = []
    while i < len(stmt.words) and not stmt.is_(i, *stop):
        if stmt.words[i] != "," and not stmt.is_(i, *_NOT_ROLES):
            found.append(_role_name(stmt, i))
        i += 1
    return found, i


def _grant_roles(stmt: Statement, verb: int) -> list[str]:
    """The grantees (after the last TO of a GRANT, FROM of a REVOKE: a type such as ``interval
    day to second`` in a function's signature comes earlier) and the GRANTED BY role."""
    keyword = "TO" if stmt.is_(verb, "GRANT") else "FROM"
    at = max((i for i in range(verb + 1, len(stmt.words)) if stmt.is_(i, keyword)), default=None)
    if at is None:
        return []
    found, end = _roles(stmt, at + 1, ("WITH", "GRANTED", "CASCADE", "RESTRICT"))
    if stmt.is_(end, "GRANTED") and stmt.is_(end + 1, "BY"):
        found.extend(_roles(stmt, end + 2, ("CASCADE", "RESTRICT"))[0])
    return found


def _policy_roles(stmt: Statement) -> list[str]:
    """``CREATE POLICY p ON t [AS ...] [FOR ...] TO roles [USING (...)] [WITH CHECK (...)]``:
    the TO list, looked for before the expressions."""
    for i in range(2, len(stmt.words)):
        if stmt.is_(i, "USING", "WITH"):
            return []
        if stmt.is_(i, "TO"):
            return _roles(stmt, i + 1, ("USING", "WITH"))[0]
    return []


def _role_name(stmt: Statement, i: int) -> str:
    """Token ``i`` as a role name; pg_restore writes ``SET SESSION AUTHORIZATION 'name'``."""
    raw = stmt.raw[i]
    if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
        return raw[1:-1].replace("''", "'")
    return stmt.name(i)
