"""Shared fixtures; prints the measured figures (parity, INT8 agreement) at the end."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        for key, value in getattr(report, "user_properties", []):
            if key.startswith("figure:"):
                rows.append((report.nodeid.split("::")[-1], key[7:], value))
    if rows:
        terminalreporter.section("measured figures")
        for test, key, value in rows:
            terminalreporter.write_line(f"{test:<48} {key:<32} {value}")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")
