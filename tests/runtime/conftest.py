"""Fixtures for real-process tests: every cloud started is stopped in the finalizer,
even when the test fails, and the finalizer checks that no process is left behind."""

from runtime_harness import api_target, ha_cloud, shared_ha_cloud, single_cloud

__all__ = ["api_target", "ha_cloud", "shared_ha_cloud", "single_cloud"]
