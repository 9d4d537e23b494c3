"""One exception tree for pgkeeper; front doors translate it into exit codes and HTTP statuses.

Every error message is one lowercase line that names the object and says what to do.
Secrets never appear in messages: callers pass redacted URLs (see ``postgres.redact_url``).

    PgkeeperError                      exit 1 unless a subclass says otherwise
    ├── UsageError                     exit 2: bad input the user must fix
    │   ├── ConfigError                a setting is missing or malformed
    │   ├── InvalidBackupIdError       an id that is not of the backup id shape (e.g. a path)
    │   ├── BackupNotFoundError        no backup with that id on any target
    │   ├── NotADumpError              an imported file is not a PostgreSQL dump
    │   ├── ConfirmationRequiredError  restoring over a database with data without --confirm
    │   ├── BackupExistsError          a backup id that must be new is taken (an import's own)
    │   ├── AuthenticationError        the server rejected the credentials
    │   ├── DatabaseMissingError       the database named in the URL does not exist
    │   ├── ClientVersionError         pg_dump/pg_restore older than the server
    │   └── IdentityError              an encrypted backup needs an age identity that opens it
    ├── BackupRunningError             another backup of the same database holds the lock
    ├── DatabaseError                  the server failed a command
    │   └── DatabaseUnavailableError   cannot reach the server (Transient)
    ├── DumpError                      pg_dump / pg_restore / psql exited with an error
    ├── VerificationError              a stored backup failed a check (names the check)
    ├── RestoreError                   a restore failed; the target was left as it was
    ├── ArchiveError                   the WAL archive (point-in-time recovery) failed
    │   ├── WalConflictError           other bytes are archived under that name: never replaced
    │   ├── WalMissingError            a WAL file is not in the archive (past its end: normal)
    │   └── WalGapError                a WAL file is missing while later ones exist, or damaged
    └── StorageError                   a storage target failed
        ├── StorageFullError           no space left on the target
        ├── StoragePermissionError     the target refuses access (exit 2: fix permissions)
        └── TransientStorageError      a retryable failure: 5xx, throttling, reset, timeout

``Transient`` is a marker mixin: Prefect task retries are conditioned on ``is_transient``.
"""

from __future__ import annotations


class PgkeeperError(Exception):
    """Base of every error pgkeeper raises on purpose."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Transient:
    """Marker: the operation may succeed if retried later."""


class UsageError(PgkeeperError):
    exit_code = 2
    http_status = 400


class ConfigError(UsageError):
    pass


class InvalidBackupIdError(UsageError):
    pass


class BackupNotFoundError(UsageError):
    http_status = 404


class NotADumpError(UsageError):
    http_status = 422


class ConfirmationRequiredError(UsageError):
    http_status = 409


class BackupExistsError(UsageError):
    http_status = 409


class AuthenticationError(UsageError):
    pass


class DatabaseMissingError(UsageError):
    http_status = 404


class ClientVersionError(UsageError):
    pass


class IdentityError(UsageError):
    """An encrypted backup and no identity (BACKUP_ENCRYPTION_IDENTITY_FILE / --identity),
    an unreadable identity file, or one none of whose keys is a recipient of the backup."""


class BackupRunningError(PgkeeperError):
    http_status = 409


class DatabaseError(PgkeeperError):
    http_status = 502


class DatabaseUnavailableError(DatabaseError, Transient):
    http_status = 503


class DumpError(PgkeeperError):
    pass


class VerificationError(PgkeeperError):
    http_status = 422

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check


class RestoreError(PgkeeperError):
    pass


class ArchiveError(PgkeeperError):
    """The WAL archive of point-in-time recovery failed (``pgkeeper.wal``)."""


class WalConflictError(ArchiveError):
    http_status = 409


class WalMissingError(ArchiveError):
    http_status = 404


class WalGapError(ArchiveError):
    pass


class StorageError(PgkeeperError):
    pass


class StorageFullError(StorageError):
    http_status = 507


class StoragePermissionError(StorageError):
    exit_code = 2
    http_status = 403


class TransientStorageError(StorageError, Transient):
    http_status = 503


def is_transient(exc: BaseException) -> bool:
    """True when retrying the failed operation may help."""
    return isinstance(exc, Transient)
