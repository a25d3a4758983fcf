"""Integration tests run against the real local cluster (``cluster`` fixture in
``tests/conftest.py``); every test here is marked ``cluster``."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Mark the tests of this directory with ``cluster``."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)
