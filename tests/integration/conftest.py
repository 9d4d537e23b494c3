"""Integration fixtures: a sample database with several tables, settings that point at it, and
one Prefect test server for the whole session (its ~10 s start is paid once).

- `sample_db` -> the URL of a new database holding a small shop schema (several tables,
  foreign keys, a sequence, text/numeric/jsonb columns); dropped after the test.
- `pgk_settings` -> `Settings` with `DATABASE_URL` = `sample_db` and `BACKUP_DIR` in tmp_path.
- `prefect_server` -> the API URL of a session-wide `prefect_test_harness` server.
- `prefect_server_process` -> the API URL of a real `prefect server start` (with services:
  proactive automations run there, not in the harness); started by the tests that need it.
- `server_pgkeeper` -> a `pgkeeper` the PostgreSQL server's user can run (archive_command,
  restore_command): a venv of this checkout built once per session (~40 s; slow tests only).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper.settings import Settings, load_settings
from tests.servers.postgres import PgCluster

SHOP_SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (
    id bigserial PRIMARY KEY, name text NOT NULL, email text UNIQUE, created date NOT NULL
);
CREATE TABLE shop.products (
    id serial PRIMARY KEY, title text NOT NULL, price numeric(10, 2) NOT NULL, attrs jsonb
);
CREATE TABLE shop.orders (
    id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES shop.customers,
    placed timestamptz NOT NULL
);
CREATE TABLE shop.order_lines (
    order_id bigint NOT NULL REFERENCES shop.orders, product_id int NOT NULL
        REFERENCES shop.products, quantity int NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
CREATE TABLE public.audit_log (id bigserial PRIMARY KEY, note text);
INSERT INTO shop.customers (name, email, created)
    SELECT 'customer ' || g, 'c' || g || '@example.com', date '2024-01-01' + g % 365
    FROM generate_series(1, 300) g;
INSERT INTO shop.products (title, price, attrs)
    SELECT 'product ' || g, (g * 1.37)::numeric(10, 2), jsonb_build_object('color', g % 7)
    FROM generate_series(1, 40) g;
INSERT INTO shop.orders (customer_id, placed)
    SELECT 1 + g % 300, timestamptz '2024-06-01 00:00+00' + g * interval '17 minutes'
    FROM generate_series(1, 1200) g;
INSERT INTO shop.order_lines (order_id, product_id, quantity)
    SELECT o, 1 + (o * p) % 40, 1 + p FROM generate_series(1, 1200) o, generate_series(1, 3) p
    ON CONFLICT DO NOTHING;
"""

# Tables of SHOP_SCHEMA as pgkeeper.postgres.table_counts names them.
SHOP_TABLES = {
    "public.audit_log",
    "shop.customers",
    "shop.order_lines",
    "shop.orders",
    "shop.products",
}


@pytest.fixture
def sample_db(pg_cluster: PgCluster) -> Iterator[str]:
    """A new database with the shop schema; its URL (with password) is yielded."""
    name = f"shop_{uuid.uuid4().hex[:10]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(SHOP_SCHEMA, dbname=name)
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture
def pgk_settings(sample_db: str, tmp_path: Path) -> Settings:
    """Settings for backing up `sample_db` into a fresh folder, read from no `.env`."""
    return load_settings(
        _env_file=None,
        database_url=sample_db,
        backup_dir=str(tmp_path / "backups"),
        backup_compression_threads=1,
        backup_restore_test_on_source=True,  # one test cluster: it is also the "staging" one
    )


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One Prefect server (SQLite in the session's PREFECT_HOME) for every flow test."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def flow_env(
    prefect_server: str, sample_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Tasks read settings from the environment: point them at the sample db and a tmp folder."""
    backups = tmp_path / "backups"
    monkeypatch.setenv("DATABASE_URL", sample_db)
    monkeypatch.setenv("BACKUP_DIR", str(backups))
    monkeypatch.setenv("BACKUP_COMPRESSION_THREADS", "1")
    monkeypatch.setenv("BACKUP_RESTORE_TEST_ON_SOURCE", "true")  # one test cluster
    return backups


@pytest.fixture(scope="session")
def prefect_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` (services on: proactive automations are evaluated) for
    the session; its API URL. Its database lives in a folder of its own."""
    import os

    from tests.servers.prefect import PrefectServer

    home = tmp_path_factory.mktemp("prefect-server")
    saved = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)  # inherited by the server process only
    try:
        server = PrefectServer().start()
    finally:
        if saved is not None:
            os.environ["PREFECT_HOME"] = saved
    try:
        yield server.api_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_pgkeeper() -> Iterator[Path]:
    """This checkout installed in a venv the `postgres` user can run; its `pgkeeper`."""
    import shutil

    from tests.support.pitr import build_server_venv, shared_dir

    folder = shared_dir("pgkeeper-server-venv-")
    try:
        yield build_server_venv(folder / "venv")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
