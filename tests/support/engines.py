"""Tests of engines that a machine may lack (PostgreSQL, Chromium): skipped where absent, never in CI."""

from __future__ import annotations

import os

import pytest


def missing(reason: str) -> None:
    """Skip a test whose engine is not installed, with the one line ``reason`` saying how to install it; in CI
    (``CI`` set), which installs every engine, fail instead: a skip there would hide an untested path."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: see .ci/run)")
    pytest.skip(reason)
