"""Prometheus' own linter on a scrape: `promtool check metrics` (Debian's prometheus package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request

import pytest


def scrape(url: str) -> str:
    """The text of a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


def promtool_check(text: str) -> None:
    """Fail on anything promtool reports (syntax or naming problems); skip locally without it."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (scripts/test.sh installs Debian's prometheus package)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    done = subprocess.run([promtool, "check", "metrics"], input=text, text=True, capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
