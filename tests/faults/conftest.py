"""One deployed HA cloud for every host-level test under tests/faults (the quick fault set and
the Eucalyptus 3 regressions): a deploy is most of these tests' time, so it is made once, on
first use, and removed as soon as the last test of this directory is done (also when a test
fails), before any test elsewhere runs next to it.

Order within this directory: the tests without the deployed cloud first, then the quick fault
set, then the regressions on hosts (they end by powering a host off for good)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults import cloud as cloud_mod
from faults.cloud import Cloud

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_harness import ha_cloud, single_cloud

__all__ = ["demo_cloud", "ha_cloud", "single_cloud"]

BED = os.environ.get("FAULTS_BED", "flt")
KV_PORT = 8779  # as tests/integration/deploy_harness.py: its kv helpers reach hosts there
HERE = Path(__file__).resolve().parent

_deployed: dict[str, Cloud] = {}
_workdirs: list[Path] = []


def _remove() -> None:
    """Remove the bed if this session made one (idempotent)."""
    cloud = _deployed.pop("cloud", None)
    if cloud is not None:
        cloud.hosts.close()
    while _workdirs:
        cloud_mod.remove(BED, _workdirs.pop())


@pytest.fixture(scope="session")
def demo_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    workdir = tmp_path_factory.mktemp("faults-cloud")
    cloud_mod.remove(BED)  # a bed left by an interrupted run
    _workdirs.append(workdir)
    try:
        _deployed["cloud"] = cloud_mod.deploy(BED, workdir, extra_vars={"euca_runtime_kv_api_port": KV_PORT})
        yield _deployed["cloud"]
    finally:
        _remove()


def _here(item: pytest.Item | None) -> bool:
    return item is not None and HERE in Path(item.path).resolve().parents


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _here(item) and not _here(nextitem):
        _remove()  # the last test here: no bed left running under the rest of the suite


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Reorder this directory's items as the module docstring says; items elsewhere keep their
    places."""
    slots = [i for i, item in enumerate(items) if _here(item)]
    mine = [items[i] for i in slots]

    def rank(item: pytest.Item) -> int:
        if "demo_cloud" not in getattr(item, "fixturenames", ()):
            return 0
        return 1 if Path(item.path).name == "test_quick.py" else 2

    mine.sort(key=rank)
    for i, item in zip(slots, mine, strict=True):
        items[i] = item
