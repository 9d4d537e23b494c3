"""Helpers shared by test modules that are not servers (see tests/servers for those)."""
