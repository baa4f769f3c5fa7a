"""Test-only helpers (independent reference implementations, file writers)."""
