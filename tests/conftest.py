"""Shared fixtures. Tests that need the testbed are marked `testbed` and need root."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import settings

# Tests assert behaviour, never speed: no per-example deadline (a loaded CI machine is slow).
settings.register_profile("euca", deadline=None)
settings.load_profile("euca")


def _testbed_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, mounts, bridges)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn not installed: run `make deps`"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _testbed_missing()
    if reason is None:
        return
    for item in items:
        if "testbed" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
