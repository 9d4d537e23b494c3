"""The shipped monitoring examples (docs/monitoring/) are valid and use only metric names that
pgkeeper.metrics really exports: the Prometheus rules pass `promtool check rules`, the Grafana
dashboard is JSON whose every query names real metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pgkeeper.metrics import build_registry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
RULES = DOCS / "prometheus-rules.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"


def exported() -> set[str]:
    registry = build_registry([])
    return {metric.name for metric in registry.collect()}


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bpgkeeper_[a-z_]+\b", text))


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    """Every pgkeeper_* name in the rules and the dashboard queries is a metric we export."""
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = names_in(RULES.read_text()) | names_in(" ".join(queries))

    assert used and used <= exported(), used - exported()


def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` (Debian's prometheus package, or PROMTOOL=path) accepts them."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed: Debian's prometheus package (96 MB, a daemon, 37 packages) "
            "is not part of scripts/system-deps.sh; set PROMTOOL=/path/to/promtool to check"
        )
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
