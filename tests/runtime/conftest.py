"""Fixtures for real-process tests: every cloud started is stopped in the finalizer,
even when the test fails, and the finalizer checks that no process is left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_harness import Cloud, start_cloud, stop_cloud


@pytest.fixture
def ha_cloud(tmp_path: Path) -> Iterator[Cloud]:
    """A fresh `up --ha` cloud, stopped afterwards whatever happens."""
    root = tmp_path / "cloud"
    try:
        yield start_cloud(root, ha=True)
    finally:
        stop_cloud(root)


@pytest.fixture
def single_cloud(tmp_path: Path) -> Iterator[Cloud]:
    root = tmp_path / "cloud"
    try:
        yield start_cloud(root, ha=False)
    finally:
        stop_cloud(root)
