"""sd_notify over a real datagram socket, and the death certificate's guards (no network)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from euca_runtime import death, sdnotify


def test_notify_reaches_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"euca-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert not sdnotify.notify("READY=1")
    assert sdnotify.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_sec_and_only_for_its_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


def test_pid_alive() -> None:
    assert death.pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not death.pid_alive(child.pid)


def test_no_certificate_for_a_live_process_or_without_leases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A live pid is never certified dead; an empty held.json certifies nothing (no peer is dialled)."""
    (tmp_path / "pki").mkdir()
    for f in ("ca.crt", "node.crt", "node.key"):
        (tmp_path / "pki" / f).write_text("")
    config = tmp_path / "runtime.yml"
    config.write_text(
        "node: n1\nlisten: 127.0.0.1:7100\nadmin: 127.0.0.1:7200\ndata_dir: data\n"
        "tls: {ca: pki/ca.crt, cert: pki/node.crt, key: pki/node.key}\nvoters: [n1, n2, n3]\n"
        "peers: {n2: '127.0.0.1:1', n3: '127.0.0.1:2'}\n"
    )
    data = tmp_path / "data"
    data.mkdir()
    lease = {"group": "kv", "holder": "n1.kv", "epoch": 3}
    (data / "held.json").write_text(json.dumps({"node": "n1", "pid": os.getpid(), "leases": [lease]}))
    assert death.certify(str(config)) == 0
    assert "still alive" in capsys.readouterr().err
    (data / "held.json").write_text(json.dumps({"node": "n1", "pid": 999999999, "leases": []}))
    assert death.certify(str(config)) == 0
    assert "held no lease" in capsys.readouterr().err
