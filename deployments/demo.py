"""``make demo`` / ``pgkeeper demo``: the whole system on one machine, offline, in one command.

In order:
  1. a local Prefect server: SQLite under ``.demo/prefect`` (``PREFECT_HOME``), telemetry off,
     on ``PREFECT_PORT`` (default 4200) with the UI told where its API is
  2. when ``DATABASE_URL`` is unset, a throwaway PostgreSQL server holding a small fleet: the
     sample ``shop`` database (customers, products, orders, order lines, payments: ~100k rows),
     ``crm`` and ``analytics``, and a ``shop_app`` role; ``BACKUP_DATABASES`` names the whole
     server (``/*``) so every run backs up all of them and the server's roles; when
     ``STAGING_DATABASE_URL`` is unset, a second, empty one as the staging server that restore
     tests load (the recommended shape: restore tests never run on the production server)
  3. alerts: unless ``BACKUP_NOTIFY_URLS`` is set, a local webhook receiver that prints every
     alert in this console; ``pgkeeper alerts install`` (the block and automations)
  4. ``python -m deployments.serve``: every deployment, scheduled
  5. a first ``backup`` and ``restore-test`` run through their deployments, so the UI has runs
     and artifacts to show
  6. where to look; then it waits. Ctrl-C or SIGTERM stops everything, in reverse order:
     serve (in-flight runs cancelled and cleaned up), the Prefect server, the sample databases.
Its files live in ``./.demo`` (the folder it was started from); backups go to ``.demo/backups``
unless ``BACKUP_DIR`` is set. It needs only the installed package and the PostgreSQL server
binaries: the throwaway clusters are ``pgkeeper.sandbox``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from pgkeeper.sandbox import PgCluster

# The demo's files (Prefect's SQLite, logs, backups) live in ./.demo of the folder it is started
# from: the checkout for `make demo`, any folder for an installed `pgkeeper demo`.
DEMO = Path.cwd() / ".demo"
PYTHON = sys.executable
PREFECT = str(Path(sys.executable).with_name("prefect"))  # the command the banner shows
RUN_TIMEOUT = 600  # seconds to wait for the first backup / restore-test

SAMPLE_SQL = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (
    id bigserial PRIMARY KEY, name text NOT NULL, email text NOT NULL UNIQUE,
    country char(2) NOT NULL, created_at timestamptz NOT NULL
);
CREATE TABLE shop.products (
    id serial PRIMARY KEY, sku text NOT NULL UNIQUE, title text NOT NULL,
    price numeric(10, 2) NOT NULL CHECK (price >= 0), attributes jsonb NOT NULL
);
CREATE TABLE shop.orders (
    id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES shop.customers,
    status text NOT NULL, placed_at timestamptz NOT NULL
);
CREATE TABLE shop.order_lines (
    order_id bigint NOT NULL REFERENCES shop.orders, product_id int NOT NULL
        REFERENCES shop.products, quantity int NOT NULL CHECK (quantity > 0),
    unit_price numeric(10, 2) NOT NULL, PRIMARY KEY (order_id, product_id)
);
CREATE TABLE shop.payments (
    id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES shop.orders,
    amount numeric(12, 2) NOT NULL, method text NOT NULL, paid_at timestamptz NOT NULL
);
CREATE INDEX ON shop.orders (customer_id);
INSERT INTO shop.customers (name, email, country, created_at)
    SELECT initcap(md5(g::text)::varchar(8)) || ' ' || initcap(md5((g * 3)::text)::varchar(10)),
           'user' || g || '@example.com',
           (ARRAY['DE', 'FR', 'US', 'JP', 'BR', 'IN', 'GB'])[1 + g % 7],
           timestamptz '2023-01-01' + (g * 613) % 63072000 * interval '1 second'
    FROM generate_series(1, 10000) g;
INSERT INTO shop.products (sku, title, price, attributes)
    SELECT 'SKU-' || lpad(g::text, 5, '0'), 'Product ' || md5(g::text)::varchar(12),
           round((5 + (g * 37) % 500)::numeric + 0.99, 2),
           jsonb_build_object('color', (ARRAY['red', 'green', 'blue', 'black'])[1 + g % 4],
                              'weight_g', 50 + g % 2000, 'tags', jsonb_build_array('demo', g % 10))
    FROM generate_series(1, 500) g;
INSERT INTO shop.orders (customer_id, status, placed_at)
    SELECT 1 + (g * 7919) % 10000, (ARRAY['paid', 'shipped', 'delivered', 'cancelled'])[1 + g % 4],
           timestamptz '2024-01-01' + g * interval '5 minutes'
    FROM generate_series(1, 30000) g;
INSERT INTO shop.order_lines (order_id, product_id, quantity, unit_price)
    SELECT o, 1 + (o * 31 + l * 17) % 500, 1 + (o + l) % 4, round((5 + (o * l) % 500)::numeric, 2)
    FROM generate_series(1, 30000) o, generate_series(1, 2) l;
INSERT INTO shop.payments (order_id, amount, method, paid_at)
    SELECT o.id, sum(l.quantity * l.unit_price), (ARRAY['card', 'paypal', 'invoice'])[1 + o.id % 3],
           o.placed_at + interval '3 minutes'
    FROM shop.orders o JOIN shop.order_lines l ON l.order_id = o.id
    WHERE o.status <> 'cancelled' GROUP BY o.id;
ANALYZE;
"""

# The rest of the demo fleet: two smaller databases and an application role, so the console
# shows several databases and the server's globals (roles) being backed up.
FLEET_SQL = {
    "crm": """
CREATE TABLE contacts (
    id serial PRIMARY KEY, name text NOT NULL, company text, last_call date
);
INSERT INTO contacts (name, company, last_call)
    SELECT 'Contact ' || g, 'Company ' || g % 300, date '2024-01-01' + g % 700
    FROM generate_series(1, 5000) g;
""",
    "analytics": """
CREATE TABLE page_views (
    viewed_at timestamptz NOT NULL, path text NOT NULL, visitor uuid NOT NULL
);
INSERT INTO page_views
    SELECT timestamptz '2024-06-01' + g * interval '7 seconds',
           '/products/' || g % 500, md5(g::text)::uuid
    FROM generate_series(1, 40000) g;
CREATE INDEX ON page_views (viewed_at);
""",
}
APP_ROLE_SQL = """
CREATE ROLE shop_app LOGIN PASSWORD 'demo-app-password' CONNECTION LIMIT 20;
GRANT USAGE ON SCHEMA shop TO shop_app;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA shop TO shop_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA shop TO shop_app;
"""


class Stop(Exception):
    """Raised by the SIGTERM handler so the cleanup below runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Stop()


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2) as response,  # noqa: S310 - a local URL
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s (see .demo/*.log)")


def _stop(proc: subprocess.Popen[bytes] | None, name: str, grace: float = 30) -> None:
    """SIGTERM a child's process group, SIGKILL it after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    _say(f"stopping {name}...")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def prefect_env(port: int) -> dict[str, str]:
    """The environment of every Prefect process of the demo (server, serve, CLI)."""
    api = f"http://127.0.0.1:{port}/api"
    return {
        "PREFECT_HOME": str(DEMO / "prefect"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api,  # the UI follows the port (it does not by itself)
        "PREFECT_API_URL": api,
    }


@contextlib.contextmanager
def sample_server() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL server with the demo fleet (``shop``, ``crm``, ``analytics``, the
    ``shop_app`` role); yields (the ``shop`` database's URL, the whole server's ``/*`` URL)."""
    with PgCluster() as cluster:
        cluster.create_database("shop")
        cluster.execute(SAMPLE_SQL, dbname="shop")
        cluster.execute(APP_ROLE_SQL, dbname="shop")
        for name, sql in FLEET_SQL.items():
            cluster.create_database(name)
            cluster.execute(sql, dbname=name)
        shop = cluster.url("shop")
        yield shop, shop.rsplit("/", 1)[0] + "/*"


@contextlib.contextmanager
def staging_server() -> Iterator[str]:
    """A second throwaway PostgreSQL cluster, the staging server of restore tests; its URL."""
    with PgCluster() as cluster:
        yield cluster.url("postgres")


class _AlertPrinter(BaseHTTPRequestHandler):
    """The demo's alert channel: Apprise ``json://`` posts land here and are printed."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            alert: dict[str, Any] = json.loads(raw)
        except ValueError:
            alert = {"title": "(not JSON)", "message": raw.decode(errors="replace")}
        lines = [f"[alert] {alert.get('title', '')}"]
        lines += [f"[alert]   {line}" for line in str(alert.get("message", "")).splitlines()]
        print("\n".join(lines), flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def alert_printer() -> tuple[ThreadingHTTPServer, str]:
    """Start the printing receiver on a free port; its Apprise URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AlertPrinter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"json://127.0.0.1:{server.server_address[1]}/demo-alerts"


def _install_alerts() -> None:
    from deployments.alerts import install
    from pgkeeper.settings import load_settings

    report = install(load_settings())
    for line in report.lines:
        _say(f"alerts: {line}")
    if not report.ok:
        _say(f"alerts: {report.problem}")


def _run_deployment(name: str) -> str:
    """Start a run of a deployment through the API and wait for its final state."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        run = client.create_flow_run_from_deployment(deployment.id)
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            state = client.read_flow_run(run.id).state
            if state is not None and state.is_final():
                return f"{state.name}" + (f": {state.message}" if state.message else "")
            time.sleep(1)
    return "still running (see the UI)"


def _wait_for_deployments(names: list[str], timeout: float) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                for name in names:
                    client.read_deployment_by_name(name)
                return
            except Exception:  # not registered yet
                time.sleep(1)
    raise RuntimeError("serve did not register its deployments in time (see .demo/serve.log)")


def _banner(port: int, backup_dir: str, results: dict[str, str], names: list[str]) -> None:
    ui = f"http://127.0.0.1:{port}"
    prefect = os.path.relpath(PREFECT) if PREFECT.startswith(f"{Path.cwd()}/") else PREFECT
    lines = [
        "",
        "=" * 78,
        f"pgkeeper demo is running.  Prefect UI: {ui}",
        f"  deployments: {ui}/deployments    runs: {ui}/runs    artifacts: {ui}/artifacts",
        f"  backups in:  {backup_dir}",
        f"  the fleet:   {ui}/artifacts/key/fleet-inventory  (every database, its newest "
        "backup, its RPO)",
        f"  backups:     {ui}/artifacts/key/backup-inventory",
        "",
        "first runs:",
        *[f"  {name:<28} {result}" for name, result in results.items()],
        "",
        "deployments served (trigger any of them from the UI, or from another shell):",
        *[f"  {name}" for name in names],
        "",
        "  export PREFECT_API_URL=" + f"{ui}/api",
        f"  {prefect} deployment run 'backup/backup-daily'",
        f"  {prefect} deployment run 'restore/restore'          # into a NEW database",
        f"  {prefect} deployment run 'restore-test/restore-test'",
        "",
        "alerts print here as [alert] lines. Break something to see one:",
        f"  {prefect} deployment run 'backup/backup-daily' -p name='bad name!'",
        "  then a good backup tells it resolved:",
        f"  {prefect} deployment run 'backup/backup-daily'",
        f"  automations: {ui}/automations",
        "",
        "Ctrl-C stops everything (serve, Prefect server, sample databases). Logs: .demo/*.log",
        "=" * 78,
    ]
    print("\n".join(lines), flush=True)


def main() -> int:
    """Run the demo until Ctrl-C/SIGTERM; 0 on a clean stop, 1 when start-up failed."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    port = int(os.environ.get("PREFECT_PORT", "4200"))
    DEMO.mkdir(exist_ok=True)
    os.environ.update(prefect_env(port))  # before anything imports Prefect: it reads them once
    env = dict(os.environ)
    server: subprocess.Popen[bytes] | None = None
    serve: subprocess.Popen[bytes] | None = None
    with contextlib.ExitStack() as stack:
        try:
            if not _port_free(port):
                _say(f"port {port} is in use: set PREFECT_PORT to a free port")
                return 1
            _say(f"starting the Prefect server on port {port} (SQLite in .demo/prefect)...")
            server_log = stack.enter_context((DEMO / "prefect-server.log").open("ab"))
            server = subprocess.Popen(
                [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(port)],
                env=env, stdout=server_log, stderr=server_log, start_new_session=True,
            )  # fmt: skip
            _wait_http(f"http://127.0.0.1:{port}/api/health", 120)

            if not env.get("DATABASE_URL"):
                _say("DATABASE_URL is unset: starting a sample PostgreSQL server with three "
                     "databases (shop, crm, analytics) and a role...")  # fmt: skip
                shop, whole_server = stack.enter_context(sample_server())
                env["DATABASE_URL"] = shop
                if not env.get("BACKUP_DATABASES") and not env.get("BACKUP_INVENTORY"):
                    env["BACKUP_DATABASES"] = whole_server
            if not env.get("STAGING_DATABASE_URL") and not env.get("STAGING_DATABASE_URL_FILE"):
                _say("STAGING_DATABASE_URL is unset: starting a separate staging PostgreSQL "
                     "for the restore tests...")  # fmt: skip
                env["STAGING_DATABASE_URL"] = stack.enter_context(staging_server())
            env.setdefault("BACKUP_DIR", str(DEMO / "backups"))

            if not env.get("BACKUP_NOTIFY_URLS"):
                printer, url = alert_printer()
                stack.callback(printer.shutdown)
                env["BACKUP_NOTIFY_URLS"] = url
                _say("alerts go to a local receiver that prints them here ([alert] lines)")
            os.environ.update({k: env[k] for k in ("BACKUP_NOTIFY_URLS", "BACKUP_DIR")})
            _install_alerts()

            _say("serving every deployment (log: .demo/serve.log)...")
            serve_log = stack.enter_context((DEMO / "serve.log").open("ab"))
            serve = subprocess.Popen(
                [PYTHON, "-m", "deployments.serve"], env=env,
                stdout=serve_log, stderr=serve_log, start_new_session=True,
            )  # fmt: skip
            from deployments.schedules import plan
            from pgkeeper.settings import load_settings

            names = [f"{s.flow}/{s.name}" for s in plan(load_settings())]
            _wait_for_deployments(names, 120)

            results: dict[str, str] = {}
            for name in ("backup/backup-daily", "restore-test/restore-test"):
                _say(f"running {name}...")
                results[name] = _run_deployment(name)
                _say(f"{name}: {results[name]}")
            _banner(port, env["BACKUP_DIR"], results, names)
            while serve.poll() is None and server.poll() is None:
                time.sleep(1)
            _say("a child process exited; stopping (see .demo/*.log)")
            return 1
        except (KeyboardInterrupt, Stop):
            _say("stopping...")
            return 0
        except Exception as exc:  # start-up failed: say why in one line, then clean up
            _say(f"error: {exc}")
            return 1
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _stop(serve, "serve (in-flight runs are cancelled)")
            _stop(server, "the Prefect server")
            if "DATABASE_URL" not in os.environ:
                _say("stopping the sample databases...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
