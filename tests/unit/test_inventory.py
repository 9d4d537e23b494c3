"""The inventory without servers: the three ways to say the fleet, overrides, passwords from the
environment or a file, and one-line errors for a careless file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgkeeper.errors import ConfigError, UsageError
from pgkeeper.fleet import across_servers
from pgkeeper.inventory import configured, load_inventory
from pgkeeper.settings import load_settings

SECRET = "inv-s3cr3t-pw"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def test_database_url_alone_is_a_fleet_of_one() -> None:
    """Only DATABASE_URL: one database, its settings the process's own."""
    settings = load_settings(_env_file=None, database_url="postgresql://u:pw@db:5433/shop")
    inventory = load_inventory(settings)
    assert [d.key for d in inventory.databases] == ["shop@db:5433"]
    assert inventory.databases[0].settings is not None and inventory.servers == []


def test_backup_databases_lists_urls_and_star_servers_get_their_globals() -> None:
    """Several URLs; a '*' server (not asked here) has its globals backed up."""
    settings = load_settings(
        _env_file=None,
        backup_databases="postgresql://u@a:5432/one, postgresql://u@b:5432/*",
    )
    inventory = load_inventory(settings, expand=False)
    assert [d.key for d in inventory.databases] == ["one@a:5432"]
    assert [s.server for s in inventory.servers] == ["b:5432"]
    assert inventory.lookup("two").key == "two@b:5432"  # a '*' server's database by name


def test_the_file_applies_defaults_then_server_then_database_overrides(tmp_path: Path) -> None:
    """defaults < server < database; enabled: false keeps the database listed but disabled."""
    path = write(tmp_path, """
defaults: {keep_daily: 7, schedule: daily}
servers:
  - url: postgresql://backup@db1:5432/shop
    schedule: hourly
    databases:
      shop: {max_backups: "3"}
      legacy: {enabled: false, targets: [/srv/legacy, "s3://bucket/legacy"]}
  - url: postgresql://backup@db2:5432/app
""")
    inventory = load_inventory(load_settings(_env_file=None, backup_inventory=str(path)))
    shop, legacy, app = inventory.databases
    assert (shop.key, shop.settings.backup_schedule, shop.settings.backup_max_backups) == (
        "shop@db1:5432", "hourly", 3,
    )
    assert shop.settings.backup_keep_daily == 7 and app.settings.backup_schedule == "daily"
    assert not legacy.enabled and [d.key for d in inventory.enabled] == ["shop@db1:5432",
                                                                        "app@db2:5432"]
    assert legacy.settings.backup_dir == "/srv/legacy"
    assert legacy.settings.backup_targets == ["s3://bucket/legacy"]


def test_passwords_come_from_the_environment_or_a_file_never_the_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """password_env and password_file put the password into the database's URL only."""
    secret_file = tmp_path / "db2-password"
    secret_file.write_text(SECRET + "-2\n")
    monkeypatch.setenv("DB1_PASSWORD", SECRET)
    path = write(tmp_path, f"""
servers:
  - url: postgresql://backup@db1:5432/shop
    password_env: DB1_PASSWORD
  - url: postgresql://backup@db2:5432/app
    password_file: {secret_file}
""")
    shop, app = load_inventory(load_settings(_env_file=None, backup_inventory=str(path))).databases
    assert SECRET in shop.url and SECRET + "-2" in app.url
    assert SECRET not in shop.display and SECRET not in repr(shop)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("servers: [{url: 'postgresql://u@h/db', keep_dialy: 3}]", "unknown setting 'keep_dialy'"),
        ("servers: [{url: 'postgresql://u@h/db', max_backups: -1}]", "max_backups='-1' is invalid"),
        ("servers: [{url: 'postgresql://u@h/db', password_env: NOPE_NOT_SET}]", "NOPE_NOT_SET"),
        ("servers: []", "at least one server"),
        ("servers: [{url: 'postgresql://u@h/db'}, {url: 'postgresql://u@h/db'}]", "listed twice"),
        ("servers: [{name: x}]", "needs a url"),
        ("servers: [ {url: 'x'", "not valid YAML"),
        ("databases: []", "unknown key(s) databases"),
    ],
)
def test_a_careless_inventory_is_one_line_naming_the_problem(
    text: str, words: str, tmp_path: Path
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_inventory(load_settings(_env_file=None, backup_inventory=str(path)))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_inventory_and_database_list_together_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "servers: [{url: 'postgresql://u@h/db'}]")
    settings = load_settings(
        _env_file=None, backup_inventory=str(path), backup_databases="postgresql://u@h/x"
    )
    with pytest.raises(ConfigError, match="use one"):
        load_inventory(settings)


def test_an_unknown_or_ambiguous_database_is_a_usage_error() -> None:
    settings = load_settings(
        _env_file=None, backup_databases="postgresql://u@a/shop,postgresql://u@b/shop"
    )
    inventory = load_inventory(settings)
    with pytest.raises(UsageError, match="several servers"):
        inventory.lookup("shop")
    assert inventory.lookup("shop@b:5432").server == "b:5432"
    with pytest.raises(UsageError, match="not in the inventory"):
        inventory.lookup("nope")


def test_nothing_configured_is_no_inventory() -> None:
    assert configured(load_settings(_env_file=None)) is None
    with pytest.raises(ConfigError, match="no database to back up"):
        load_inventory(load_settings(_env_file=None))


def test_backup_all_takes_the_databases_in_turns_of_their_servers() -> None:
    """`pgkeeper backup --all` hands its threads a1 b1 a2 b2 ...: in inventory order every
    thread waited on the first server's slot and the servers were backed up one after the
    other (make bench-fleet: 200 databases on 2 servers took 200 x one dump)."""
    settings = load_settings(
        _env_file=None,
        backup_databases=", ".join(
            [f"postgresql://u@a:5432/a{i}" for i in range(1, 4)]
            + [f"postgresql://u@b:5432/b{i}" for i in range(1, 3)]
        ),
    )
    inventory = load_inventory(settings, expand=False)
    order = [d.name for d in across_servers(inventory.databases)]
    assert order == ["a1", "b1", "a2", "b2", "a3"]
