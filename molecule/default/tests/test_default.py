"""Testinfra checks of real host state after euca_common converged."""

import pytest


@pytest.mark.parametrize("pkg", ["python3", "python3-venv", "ca-certificates", "rsync", "iproute2"])
def test_base_packages_installed(host, pkg):
    assert host.package(pkg).is_installed


def test_service_account(host):
    user = host.user("eucalyptus")
    assert user.exists
    assert user.uid == 970
    assert user.group == "eucalyptus"
    assert user.shell == "/usr/sbin/nologin"


@pytest.mark.parametrize(
    ("path", "owner", "group", "mode"),
    [
        ("/etc/eucalyptus", "root", "eucalyptus", 0o750),
        ("/var/lib/eucalyptus", "eucalyptus", "eucalyptus", 0o700),
        ("/var/log/eucalyptus", "eucalyptus", "eucalyptus", 0o750),
    ],
)
def test_directories(host, path, owner, group, mode):
    d = host.file(path)
    assert d.is_directory
    assert d.user == owner
    assert d.group == group
    assert d.mode == mode


def test_is_a_real_systemd_host(host):
    state = host.run("systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded")
    assert host.service("ssh").is_running
    # The testbed's preset leaves only what the roles decide: no stray services from the base.
    assert not host.service("postgresql").is_running
