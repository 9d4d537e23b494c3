"""Settings: the seed's environment names are read, and a bad value is a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgkeeper.errors import ConfigError
from pgkeeper.settings import load_settings


@pytest.fixture(autouse=True)
def _no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty folder so a developer's .env cannot leak in."""
    monkeypatch.chdir(tmp_path)


def test_seed_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL, BACKUP_*, AWS_* and GCS_* (the seed's names) reach the settings."""
    env = {
        "DATABASE_URL": "postgresql://u:pw@h/db",
        "BACKUP_ENABLED": "false",
        "BACKUP_SCHEDULE": "hourly,daily",
        "BACKUP_DIR": "/srv/backups",
        "BACKUP_MAX_BACKUPS": "7",
        "AWS_S3_BUCKET": "bkt",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "GCS_BUCKET": "gbkt",
        "GCS_KEYFILE": "/etc/gcs.json",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.require_database_url() == "postgresql://u:pw@h/db"
    assert settings.backup_enabled is False
    assert settings.backup_schedule == "hourly,daily"
    assert settings.backup_dir == "/srv/backups"
    assert settings.backup_max_backups == 7
    assert settings.aws_s3_bucket == "bkt"
    assert settings.aws_access_key_id == "AKIAEXAMPLE"
    assert settings.aws_secret_access_key is not None
    assert settings.aws_secret_access_key.get_secret_value() == "aws-secret"
    assert settings.gcs_bucket == "gbkt"
    assert settings.gcs_keyfile == Path("/etc/gcs.json")


def test_new_knobs_use_the_backup_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """New settings are read from BACKUP_* (plus PG_BIN_DIR and STAGING_DATABASE_URL)."""
    monkeypatch.setenv("BACKUP_LOCK_TIMEOUT", "2.5")
    monkeypatch.setenv("BACKUP_FORMAT", "plain")
    monkeypatch.setenv("BACKUP_COMPRESSION", "gzip")
    monkeypatch.setenv("BACKUP_TARGETS", "s3://a/p, gs://b ")
    monkeypatch.setenv("PG_BIN_DIR", "/usr/lib/postgresql/15/bin")
    monkeypatch.setenv("STAGING_DATABASE_URL", "postgresql://s/db")
    settings = load_settings()
    assert settings.backup_lock_timeout == 2.5
    assert settings.backup_format == "plain"
    assert settings.backup_compression == "gzip"
    assert settings.backup_targets == ["s3://a/p", "gs://b"]
    assert settings.pg_bin_dir == Path("/usr/lib/postgresql/15/bin")
    assert settings.staging_database_url is not None


def test_defaults() -> None:
    """Without configuration: custom format, zstd, folder `backups`, no lock wait."""
    settings = load_settings()
    assert settings.backup_format == "custom"
    assert settings.backup_compression == "zstd"
    assert settings.backup_dir == "backups"
    assert settings.backup_lock_timeout == 0


def test_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """repr of the settings hides the database password and cloud secrets."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2-db@h/db")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-aws")
    text = repr(load_settings()) + str(load_settings())
    assert "hunter2" not in text


def test_missing_database_url_says_what_to_set() -> None:
    """Without DATABASE_URL, asking for it is a ConfigError naming it and --database-url."""
    with pytest.raises(ConfigError) as info:
        load_settings().require_database_url()
    assert "DATABASE_URL" in str(info.value)
    assert "--database-url" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BACKUP_MAX_BACKUPS", "many"),
        ("BACKUP_MAX_BACKUPS", "-1"),
        ("BACKUP_ENABLED", "perhaps"),
        ("BACKUP_FORMAT", "zip"),
        ("BACKUP_COMPRESSION", "lz4"),
        ("BACKUP_LOCK_TIMEOUT", "soon"),
        ("BACKUP_JOBS", "0"),
        ("BACKUP_COMPRESSION_LEVEL", "99"),
    ],
)
def test_bad_value_is_a_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A malformed value is one line, names the variable, and says where to fix it (exit 2)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert name in message
    assert "\n" not in message
    assert "fix it" in message
    assert info.value.exit_code == 2


def test_bad_secret_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error for a bad setting never repeats the value (it may be a secret)."""
    monkeypatch.setenv("BACKUP_API_PORT", "hunter2-not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "BACKUP_API_PORT" in str(info.value)
    assert "hunter2" not in str(info.value)


# --- secrets from files (NAME_FILE, the Docker/Kubernetes convention) --------------------------

SECRET_VALUES = {
    "DATABASE_URL": "postgresql://app:file-pw@db/app",
    "STAGING_DATABASE_URL": "postgresql://app:staging-pw@staging/app",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-from-file",
    "BACKUP_API_TOKEN": "admin-token-from-file-0123456789",
    "BACKUP_API_READ_TOKEN": "read-token-from-file-0123456789",
    "BACKUP_NOTIFY_URLS": "json://hooks.example.com/from-file-token",
    "BACKUP_HEARTBEAT_URL": "https://hc.example.com/ping/from-file-uuid",
    "SENTRY_DSN": "https://key-from-file@sentry.example.com/1",
}


@pytest.mark.parametrize("name", SECRET_VALUES)
def test_every_secret_is_read_from_its_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NAME_FILE holds the secret (a trailing newline, as `echo` writes, is not part of it)."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET_VALUES[name] + "\n")
    monkeypatch.setenv(f"{name}_FILE", str(secret))
    value = getattr(load_settings(), name.lower())
    assert value is not None and value.get_secret_value() == SECRET_VALUES[name]
    assert SECRET_VALUES[name] not in repr(load_settings())


@pytest.mark.parametrize("name", SECRET_VALUES)
def test_a_secret_set_both_ways_is_an_error(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NAME and NAME_FILE together: one line naming both, never the value."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET_VALUES[name])
    monkeypatch.setenv(f"{name}_FILE", str(secret))
    monkeypatch.setenv(name, SECRET_VALUES[name])
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message == f"{name} and {name}_FILE are both set (keep one of them)"


def test_a_missing_or_empty_secret_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NAME_FILE that cannot be read, or is empty, names the variable and the path."""
    monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"DATABASE_URL_FILE .*nope cannot be read"):
        load_settings()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"DATABASE_URL_FILE .* is empty"):
        load_settings()


def test_secret_files_are_read_from_dotenv_too(tmp_path: Path) -> None:
    """A .env line NAME_FILE=... works like the environment variable."""
    secret = tmp_path / "token"
    secret.write_text("dotenv-token-0123456789")
    (tmp_path / ".env").write_text(f"BACKUP_API_TOKEN_FILE={secret}\n")
    token = load_settings().backup_api_token
    assert token is not None and token.get_secret_value() == "dotenv-token-0123456789"


def test_env_file_replaces_dotenv_and_the_environment_still_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--env-file FILE (what archive_command passes): settings come from FILE instead of
    ./.env, a variable set in the environment still wins, and an unreadable file is one
    ConfigError naming it."""
    from pgkeeper import settings as settings_module

    env_file = tmp_path / "pgkeeper.env"
    env_file.write_text("BACKUP_DIR=/from/file\nBACKUP_NAME=filed\n")
    monkeypatch.setenv("BACKUP_NAME", "from_env")
    monkeypatch.chdir(tmp_path)
    try:
        settings_module.use_env_file(env_file)
        loaded = settings_module.load_settings()
        assert (loaded.backup_dir, loaded.backup_name) == ("/from/file", "from_env")
        assert settings_module.env_file() == env_file
        with pytest.raises(ConfigError, match=r"missing\.env"):
            settings_module.use_env_file(tmp_path / "missing.env")
    finally:
        settings_module._env_file.clear()
