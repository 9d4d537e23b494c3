"""pgkeeper: automated PostgreSQL backups. This package is the core: plain functions, no Prefect."""

from __future__ import annotations

__version__ = "0.1.0"
