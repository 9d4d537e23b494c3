"""Every knob pgkeeper has, read from the environment or a ``.env`` file (pydantic-settings).

Names are a contract: the seed's names (``DATABASE_URL``, ``BACKUP_ENABLED``, ``BACKUP_SCHEDULE``,
``BACKUP_DIR``, ``BACKUP_MAX_BACKUPS``, ``AWS_S3_BUCKET``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``GCS_BUCKET``, ``GCS_KEYFILE``) keep working; every new knob has the
``BACKUP_`` prefix (plus ``STAGING_DATABASE_URL`` and ``PG_BIN_DIR``). A field named ``foo_bar``
is read from ``FOO_BAR``. Secrets are ``SecretStr``: never printed, logged or stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pgkeeper.errors import ConfigError

Format = Literal["custom", "plain", "directory"]
Compression = Literal["zstd", "gzip", "none"]


# Secret settings that can also be read from a file named by ``<NAME>_FILE``. (GCS_KEYFILE is a
# file already; BACKUP_ENCRYPTION_IDENTITY_FILE too.)
SECRET_FILE_SETTINGS = (
    "database_url",
    "backup_databases",  # a list: the file holds the URLs, comma or newline separated
    "staging_database_url",
    "aws_secret_access_key",
    "backup_api_token",
    "backup_api_read_token",
    "backup_notify_urls",
    "backup_heartbeat_url",
    "sentry_dsn",
)


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """pgkeeper's configuration; see the README's configuration table for each knob."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- the database ---------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None, description="libpq URL of the database to back up."
    )
    staging_database_url: SecretStr | None = Field(
        default=None,
        description="server for restore tests (the source server only with "
        "BACKUP_RESTORE_TEST_ON_SOURCE=true).",
    )
    pg_bin_dir: Path | None = Field(
        default=None, description="folder holding pg_dump/pg_restore/psql (default: newest found)."
    )

    # --- the fleet: many databases (inventory.py) ----------------------------------------
    backup_databases: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="libpq URLs, comma separated; a database '*' means every database there.",
    )
    backup_inventory: Path | None = Field(
        default=None, description="YAML file: servers, databases and per-database overrides."
    )
    backup_server_concurrency: int = Field(
        default=1, ge=1, le=64, description="dumps running against one server at once."
    )
    backup_fleet_concurrency: int = Field(
        default=4, ge=1, le=256, description="dumps running at once across the fleet."
    )

    # --- backups --------------------------------------------------------------------------
    backup_enabled: bool = True
    backup_schedule: str = "daily"
    backup_timezone: str = "UTC"
    # The other scheduled flows: a 5-field cron, or "off" (the deployment stays, unscheduled).
    backup_verify_schedule: str = "0 6 * * *"
    backup_restore_test_schedule: str = "0 5 * * 0"
    backup_rotate_schedule: str = "30 5 * * *"
    backup_monitor_schedule: str = "*/30 * * * *"
    backup_name: str = "auto_backup"
    backup_dir: str = Field(
        default="backups", description="primary target: a folder, file://, s3:// or gs:// URL."
    )
    backup_targets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra storage URLs, comma separated (offsite copies)."
    )
    backup_format: Format = "custom"
    backup_compression: Compression = "zstd"
    backup_compression_level: int | None = Field(default=None, ge=-7, le=22)
    backup_compression_threads: int = Field(
        default=1,
        ge=0,
        description="1: compress in the dump stream's thread; N>1: zstd workers; 0: one per core.",
    )
    backup_jobs: int = Field(default=2, ge=1, le=64, description="pg_dump -j (directory format).")
    backup_restore_jobs: int = Field(
        default=2,
        ge=1,
        le=64,
        description=(
            "connections loading a restore; N>1 deals each table's rows over N connections "
            "and builds indexes N wide (pg_restore -j); 1 pipes the backup into one pg_restore."
        ),
    )
    backup_row_counts: bool = Field(
        default=True, description="count rows per table in the dump's snapshot."
    )
    backup_lock_timeout: float = Field(
        default=0.0, ge=0, description="seconds to wait for another backup of the same database."
    )
    backup_verify: Literal["full", "quick", "off"] = "full"

    # --- retention ------------------------------------------------------------------------
    backup_max_backups: int = Field(default=30, ge=0)
    backup_keep_hourly: int = Field(default=0, ge=0)
    backup_keep_daily: int = Field(default=0, ge=0)
    backup_keep_weekly: int = Field(default=0, ge=0)
    backup_keep_monthly: int = Field(default=0, ge=0)
    backup_keep_yearly: int = Field(default=0, ge=0)
    backup_keep_within: str | None = Field(default=None, description="e.g. '7d', '12h', '2w'.")
    backup_max_total_size: str | None = Field(default=None, description="e.g. '50GB'.")
    backup_min_backups: int = Field(default=1, ge=0)
    backup_failed_grace: str = "24h"
    backup_retention_targets: str | None = Field(
        default=None,
        description='per-target overrides as JSON, e.g. {"s3": "keep_within=30d keep_monthly=12"}',
    )
    backup_usage_warn_bytes: str | None = None
    backup_safety_keep: str = Field(
        default="7d",
        description="how long rotation keeps the safety backup a restore takes ('7d', '36h').",
    )

    # --- alerts, metrics, error tracking ---------------------------------------------------
    backup_notify_urls: SecretStr | None = Field(
        default=None,
        description="Apprise URLs, comma separated (mailto://, slack://, json://...); "
        "they hold tokens and passwords, so the value is a secret.",
    )
    backup_notify_on: Literal["failure", "success", "all"] = Field(
        default="failure",
        description="failure: problems and their resolution; success/all: also every "
        "verified backup.",
    )
    backup_max_age: str | None = Field(
        default=None,
        description="no verified backup for this long is an alert (default: the backup "
        "schedule's longest gap + 1h, 25h for daily), e.g. '25h'.",
    )
    backup_size_drop_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="alert when the newest backup is smaller than this percent of the median "
        "of the last 7 verified ones (0: off).",
    )
    backup_usage_warn_percent: int = Field(
        default=80, ge=1, le=100, description="alert above this percent of the storage quota."
    )
    backup_storage_quota: str | None = Field(
        default=None, description="the storage budget of each target, e.g. '10GB'."
    )
    backup_scheduler_max_silence: str = Field(
        default="10min",
        description="alert when no serve process or worker polled the backup deployments "
        "for this long (only with a Prefect server).",
    )
    backup_restore_test_max_age: str | None = Field(
        default="14d", description="alert when no restore test passed this recently (off: never)."
    )
    backup_heartbeat_url: SecretStr | None = Field(
        default=None,
        description="dead-man service URL: <url>/start, <url> on success, <url>/fail.",
    )
    sentry_dsn: SecretStr | None = Field(
        default=None, description="Sentry DSN: failures are captured, secrets scrubbed."
    )

    # --- offsite storage ------------------------------------------------------------------
    aws_s3_bucket: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    backup_s3_prefix: str = ""
    backup_s3_endpoint_url: str | None = None
    backup_s3_region: str | None = None
    backup_s3_sse: Literal["AES256", "aws:kms"] | None = None
    backup_s3_kms_key_id: str | None = None
    backup_s3_storage_class: str | None = None
    backup_s3_object_lock_days: int | None = Field(default=None, ge=1)
    backup_s3_object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] = "GOVERNANCE"
    backup_s3_max_attempts: int = Field(default=5, ge=1)
    gcs_bucket: str | None = None
    gcs_keyfile: Path | None = None
    backup_gcs_prefix: str = ""

    # --- restore tests --------------------------------------------------------------------
    backup_checks_dir: Path | None = Field(
        default=None, description="folder of .sql files; each must return true after a restore."
    )

    # --- point-in-time recovery: WAL archive, base backups, PITR restores --------------------
    backup_wal_async: bool = Field(
        default=True,
        description=(
            "wal-push through a background pusher that archives ready WAL ahead, in parallel; "
            "false: each wal-push archives its own file."
        ),
    )
    backup_wal_push_workers: int = Field(
        default=2, ge=1, le=32, description="WAL files the background pusher archives at once."
    )
    backup_wal_compression_level: int = Field(default=1, ge=-7, le=22)
    backup_wal_push_timeout: float = Field(
        default=120.0, gt=0, description="seconds wal-push waits for its file to be archived."
    )
    backup_wal_pusher_idle: float = Field(
        default=120.0,
        ge=0,
        description="seconds the background pusher (or restore prefetcher) waits for more work.",
    )
    backup_base_schedule: str = Field(
        default="off", description="base-backup deployment: a preset, a cron, or off."
    )
    backup_base_name: str = "base"
    backup_base_checkpoint: Literal["fast", "spread"] = "fast"
    backup_base_wal_wait: float = Field(
        default=300.0, ge=0, description="seconds a base backup waits for its WAL to be archived."
    )
    backup_archive_max_lag: str = Field(
        default="15min",
        description="monitor: newest archived WAL older than this while the server writes.",
    )
    backup_pitr_restore_test_schedule: str = "off"
    backup_pitr_os_user: str = Field(
        default="postgres",
        description="run as root: who owns restored data folders and runs their server.",
    )
    backup_pitr_pgkeeper: str | None = Field(
        default=None,
        description="the pgkeeper command a restored server's restore_command runs.",
    )

    # --- HTTP API -------------------------------------------------------------------------
    backup_api_token: SecretStr | None = None
    backup_api_read_token: SecretStr | None = None
    backup_api_host: str = "127.0.0.1"
    backup_api_port: int = 8080
    backup_api_max_import_bytes: int = Field(default=10 * 1024**3, ge=1)
    backup_api_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Host names (or addresses) the API answers for besides loopback, comma separated; "
            "without a token only these and loopback are served, with one, once set, too."
        ),
    )

    # --- encryption, secrets from files, restore tests off production (issue 14) ------------
    backup_encryption_recipients: str | None = Field(
        default=None,
        description="age public keys new backups are encrypted to: age1..., ssh-ed25519 or "
        "ssh-rsa keys, comma/newline separated, or the path of a file of them (pgkeeper.crypto).",
    )
    backup_encryption_identity_file: Path | None = Field(
        default=None,
        description="file with the age (or OpenSSH) private key that decrypts backups; only "
        "where restores run, never on the backup host.",
    )
    backup_restore_test_on_source: bool = Field(
        default=False,
        description="let restore tests use the source server when STAGING_DATABASE_URL is unset.",
    )
    # NAME_FILE (Docker/Kubernetes secrets): the secret is the file's content, trailing newline
    # dropped. Setting both NAME and NAME_FILE is an error (see _secrets_from_files).
    database_url_file: Path | None = None
    backup_databases_file: Path | None = None
    staging_database_url_file: Path | None = None
    aws_secret_access_key_file: Path | None = None
    backup_api_token_file: Path | None = None
    backup_api_read_token_file: Path | None = None
    backup_notify_urls_file: Path | None = None
    backup_heartbeat_url_file: Path | None = None
    sentry_dsn_file: Path | None = None

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        """Read every ``NAME_FILE`` into its secret; raise ConfigError when both are set or the
        file cannot be read (the message names the variable and path, never the content)."""
        for name in SECRET_FILE_SETTINGS:
            path = getattr(self, f"{name}_file")
            if path is None:
                continue
            current = getattr(self, name)
            if (isinstance(current, list) and current) or (
                isinstance(current, SecretStr) and current.get_secret_value()
            ):
                raise ConfigError(
                    f"{name.upper()} and {name.upper()}_FILE are both set (keep one of them)"
                )
            try:
                value = Path(path).expanduser().read_text("utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    f"{name.upper()}_FILE {path} cannot be read ({reason}; fix the path or the "
                    "file's permissions)"
                ) from None
            if not value:
                raise ConfigError(f"{name.upper()}_FILE {path} is empty (put the secret in it)")
            if isinstance(current, list):
                items = [i.strip() for i in value.replace("\n", ",").split(",") if i.strip()]
                object.__setattr__(self, name, [SecretStr(item) for item in items])
            else:
                object.__setattr__(self, name, SecretStr(value))
        return self

    @field_validator(
        "backup_targets", "backup_api_allowed_hosts", "backup_databases", mode="before"
    )
    @classmethod
    def _targets(cls, value: object) -> object:
        return _split_list(value)

    def require_database_url(self) -> str:
        """The source database URL; raise ConfigError when it is not set."""
        if self.database_url is None or not self.database_url.get_secret_value():
            raise ConfigError(
                "DATABASE_URL is not set (set it in the environment or .env, "
                "or pass --database-url)"
            )
        return self.database_url.get_secret_value()


_env_file: list[Path] = []  # set by ``use_env_file`` (the CLI's global --env-file)


def use_env_file(path: Path) -> None:
    """Read settings from ``path`` instead of ``./.env`` from now on (variables in the
    environment still win, as with ``.env``). Raises ConfigError for an unreadable file."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"env file {str(path)!r} cannot be read ({exc.strerror}); check the path and that "
            "this user may read it"
        ) from None
    _env_file[:] = [path.absolute()]


def env_file() -> Path | None:
    """The file ``use_env_file`` chose, if any."""
    return _env_file[0] if _env_file else None


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment and ``.env`` (or the ``use_env_file`` file); bad
    values become one-line ConfigErrors."""
    if _env_file and "_env_file" not in overrides:
        overrides["_env_file"] = _env_file[0]
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "setting"
        raise ConfigError(
            f"{field.upper()} is invalid: {first['msg'].lower()} "
            "(fix it in the environment or .env)"
        ) from None
