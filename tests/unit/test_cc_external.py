"""The CC proxy's external mode against a real CC service process (as euca-cc@<cluster> runs it).

The service is a real `python -m euca_runtime.cluster.cc_service` process with
``--no-parent-watch --token-file`` on a fixed loopback port; the proxy is the real `CCProxy`;
the NCs are real `NodeController` components (record driver). Only the bus between the proxy's
gateway and the NCs is a test double (`Bus`: hands each call to the NC's own handler, as
`Node.call_instance` would). Waits poll a condition with a deadline; every process this file
starts is killed in a ``finally``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from euca_runtime.cluster.cc_proxy import CCProxy
from euca_runtime.cluster.cc_service import main as service_main
from euca_runtime.cluster.nc import NodeController
from euca_runtime.cluster.options import check_options
from euca_runtime.component import RequestError, RequestInfo, ServiceUnavailable
from euca_runtime.config import ConfigError, load_config

CLUSTER = "cluster01"
DEADLINE = 60.0  # generous: the machine is shared and loaded


class Bus:
    """The part of `Node` the gateway uses: the cluster's NCs, and one call to a named NC."""

    def __init__(self, ncs: dict[str, NodeController]) -> None:
        self.ncs = ncs

    def members(self, group: str) -> set[str]:
        assert group == f"nc/{CLUSTER}"
        return set(self.ncs)

    async def call_instance(self, name: str, method: str, body: Any, timeout: float) -> Any:
        nc = self.ncs.get(name)
        if nc is None:
            raise ServiceUnavailable(f"{name} unknown", "Unavailable")
        return await nc.peer_handlers()[method](dict(body), RequestInfo(method, "test", 0.0))


@dataclass
class Ctx:
    name: str
    data_dir: Path
    node: Any = None
    node_name: str = "node-a"
    partition: str = CLUSTER
    type: str = "cc"
    group: str = f"cc/{CLUSTER}"
    epoch: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_token(path: Path, mode: int = 0o600) -> None:
    path.write_text("s3cret-token-for-tests\n")
    path.chmod(mode)


@dataclass
class Setup:
    tmp: Path
    gateway: int
    port: int
    token: Path
    ncs: dict[str, NodeController]

    @property
    def options(self) -> dict[str, Any]:
        return check_options(
            "cc",
            {
                "service": "external",
                "gateway": f"127.0.0.1:{self.gateway}",
                "service_address": f"127.0.0.1:{self.port}",
                "token_file": str(self.token),
                "poll_interval": 0.2,
            },
        )

    def proxy(self) -> CCProxy:
        ctx = Ctx("node-a.cc.cluster01", self.tmp / "data", node=Bus(self.ncs), options=self.options)
        return CCProxy(ctx)  # type: ignore[arg-type]

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "euca_runtime.cluster.cc_service",
            "--cluster",
            CLUSTER,
            "--gateway",
            f"http://127.0.0.1:{self.gateway}",
            "--port",
            str(self.port),
            "--token-file",
            str(self.token),
            "--poll-interval",
            "0.2",
            "--no-parent-watch",
        ]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    ncs = {}
    for i in range(2):
        opts = {"cores": 4, "memory_mib": 8192, "disk_gib": 100, "driver": "record"}
        ncs[f"nc-{i}"] = NodeController(Ctx(f"nc-{i}", tmp_path / "ncs"), opts)  # type: ignore[arg-type]
    token = tmp_path / "cluster01.token"
    write_token(token)
    return Setup(tmp_path, free_port(), free_port(), token, ncs)


@contextlib.contextmanager
def service(setup: Setup) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(setup.argv(), stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


async def until_ok(what: str, probe: Callable[[], Awaitable[Any]]) -> Any:
    """`probe()`'s result once it stops raising; fails after DEADLINE with the last error."""
    end = time.monotonic() + DEADLINE
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            return await probe()
        except (RuntimeError, ServiceUnavailable, RequestError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: still failing after {DEADLINE} s: {last}")


async def until_fails(what: str, probe: Callable[[], Awaitable[Any]]) -> str:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        try:
            await probe()
        except RuntimeError as exc:
            return str(exc)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: still healthy after {DEADLINE} s")


def run_body(*ids: str) -> dict[str, Any]:
    return {"instances": [{"instance_id": i, "instance_type": "t1.micro", "image_id": "emi-1"} for i in ids]}


def service_view(setup: Setup) -> Mapping[str, Any]:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{setup.port}/v1/health",
        headers={"Authorization": f"Bearer {setup.token.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # 503: unhealthy, same document
        return dict(json.loads(exc.read()))


def test_external_options_are_checked_and_name_the_key(tmp_path: Path) -> None:
    good = {
        "service": "external",
        "gateway": "127.0.0.1:7190",
        "service_address": "[::1]:7191",
        "token_file": "/etc/eucalyptus/cc/c1.token",
    }
    assert check_options("cc", good) == good
    assert check_options("cc", {"service": "child"}) == {"service": "child"}
    for opts, msg in [
        ({"service": "sidecar"}, "service: must be one of child, external"),
        ({**good, "gateway": None}, "gateway: must be a loopback"),
        ({k: v for k, v in good.items() if k != "token_file"}, "token_file: required with service: external"),
        ({"gateway": "127.0.0.1:7190"}, "gateway: only with service: external"),
        ({**good, "gateway": "10.0.0.1:7190"}, "gateway: must be a loopback"),
        ({**good, "gateway": "localhost:7190"}, "gateway: must be a loopback"),
        ({**good, "service_address": "127.0.0.1:0"}, "service_address: must be a loopback"),
        ({**good, "service_address": "127.0.0.1:7190"}, "service_address: must differ from gateway"),
        ({**good, "token_file": "cc.token"}, "token_file: must be an absolute path"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_options("cc", opts)
    # In a configuration file: the error names the component and the key; two clusters' CCs
    # in one runtime cannot share an address.
    cfg = tmp_path / "n.yaml"
    head = (
        "node: n1\nlisten: 127.0.0.1:7100\nadmin: 127.0.0.1:7180\n"
        "data_dir: d\ntls: {ca: ca, cert: c, key: k}\nvoters: [n1]\ncomponents:\n"
    )
    ext = "service: external, token_file: /t"
    cfg.write_text(
        head + f"  - {{type: cc, partition: c1, options: {{{ext}, gateway: '127.0.0.1:7190', "
        "service_address: '127.0.0.1:7191'}}\n"
        f"  - {{type: cc, partition: c2, options: {{{ext}, gateway: '127.0.0.1:7192', "
        "service_address: '127.0.0.1:7191'}}\n"
    )
    with pytest.raises(ConfigError, match=r"components\[1\]\.options\.service_address: already used by"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("7191'}}\n  - ", "7193'}}\n  - ", 1))
    loaded = load_config(cfg)
    assert [c.options["service"] for c in loaded.components] == ["external", "external"]
    cfg.write_text(head + "  - {type: cc, partition: c1, options: {service: external}}\n")
    with pytest.raises(
        ConfigError, match=r"components\[0\]\.options: gateway: required with service: external"
    ):
        load_config(cfg)


def test_the_service_refuses_a_token_file_others_can_read_and_a_non_loopback_host(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.token.chmod(0o640)
    assert service_main(setup.argv()[3:]) == 2
    assert "lets others read it (must be 0600)" in capsys.readouterr().err
    setup.token.chmod(0o600)
    assert service_main([*setup.argv()[3:], "--host", "0.0.0.0"]) == 2
    assert "--host must be a loopback address" in capsys.readouterr().err
    assert service_main([*setup.argv()[3:], "--token-file", str(setup.tmp / "none")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_external_service_serves_through_the_proxy_and_outlives_it(setup: Setup) -> None:
    """Either may start first; the proxy never starts or stops the service; a restarted
    runtime (a new proxy) finds the same service; a stopped service fails the probe."""

    async def go() -> None:
        proxy = setup.proxy()
        try:
            # 1. The runtime first: no service yet, the probe fails (the instance is NOTREADY).
            why = await until_fails("proxy without a service", proxy.health)
            assert f"CC service at http://127.0.0.1:{setup.port} did not answer" in why
            assert proxy.proc is None and proxy.gateway_url == f"http://127.0.0.1:{setup.gateway}"
            with service(setup) as svc:
                await until_ok("proxy health with the service up", proxy.health)
                assert proxy.service_pid == svc.pid and proxy.proc is None
                # 2. ENABLED: the bus's calls reach the service with our epoch, NCs through the gateway.
                set_epoch(proxy, 3)
                await proxy.on_enabled(3)
                far = time.monotonic() + 30
                res = await proxy.forward("run_instances", run_body("i-1", "i-2"), far)
                assert sorted(r["node"] for r in res["instances"]) == ["nc-0", "nc-1"]
                assert service_view(setup)["epoch"] == 3
                assert {nc.fence for nc in setup.ncs.values()} == {3}
                # 3. The runtime stops (close): the service lives on and keeps polling.
                await proxy.close()
                assert svc.poll() is None
                # 4. The runtime comes back (a new proxy, same gateway port): same service, told
                # it is not ENABLED any more, and its view still has the instances.
                proxy = setup.proxy()
                await until_ok("a new proxy finds the running service", proxy.health)
                assert proxy.service_pid == svc.pid
                await until_ok("the service is told its role", _epoch_is(setup, None))
                set_epoch(proxy, 4)
                await proxy.on_enabled(4)
                got = await proxy.forward("describe_instances", {"instance_ids": None}, far)
                assert sorted(i["instance_id"] for i in got["instances"]) == ["i-1", "i-2"]
                # 5. The service stops (systemctl stop): the probe fails, naming it.
                svc.send_signal(signal.SIGTERM)
                assert svc.wait(timeout=30) == 0
                why = await until_fails("proxy after the service stopped", proxy.health)
                assert "did not answer its health probe" in why
            # 6. A hung service (SIGSTOP) fails the probe too.
            with service(setup) as svc:
                await until_ok("proxy health with a new service", proxy.health)
                assert proxy.service_pid == svc.pid
                svc.send_signal(signal.SIGSTOP)
                try:
                    why = await until_fails("proxy with a frozen service", proxy.health)
                    assert "did not answer its health probe" in why
                finally:
                    svc.send_signal(signal.SIGCONT)
                await until_ok("proxy health after SIGCONT", proxy.health)
        finally:
            await proxy.close()

    asyncio.run(go())


def set_epoch(proxy: CCProxy, epoch: int) -> None:
    """The lease epoch the runtime gives the instance (read by the proxy when it forwards)."""
    assert isinstance(proxy.ctx, Ctx)
    proxy.ctx.epoch = epoch


def _epoch_is(setup: Setup, epoch: int | None) -> Callable[[], Awaitable[None]]:
    async def probe() -> None:
        doc = await asyncio.to_thread(service_view, setup)
        if doc.get("epoch") != epoch:
            raise RuntimeError(f"service epoch {doc.get('epoch')}, want {epoch}")

    return probe


def test_token_file_problems_fail_the_probe_and_a_new_token_is_read(setup: Setup) -> None:
    async def go() -> None:
        proxy = setup.proxy()
        try:
            with service(setup):
                await until_ok("proxy health", proxy.health)
                setup.token.chmod(0o644)
                setup.token.touch()  # a new mtime: the proxy reads it again
                why = await until_fails("proxy with a readable token file", proxy.health)
                assert str(setup.token) in why and "must be 0600" in why
                setup.token.unlink()
                why = await until_fails("proxy without a token file", proxy.health)
                assert f"CC token file {setup.token}" in why
                # A new token that the running service does not know: refused, and said so.
                setup.token.write_text("another-token\n")
                setup.token.chmod(0o600)
                why = await until_fails("proxy with a token the service does not know", proxy.health)
                assert "refused our token" in why
        finally:
            await proxy.close()

    asyncio.run(go())


def test_without_parent_watch_the_service_outlives_its_parent(setup: Setup) -> None:
    """``--no-parent-watch``: its parent exits, it keeps serving (child mode would exit)."""
    launcher = (
        "import subprocess, sys; "
        "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL); "
        "print(p.pid)"
    )
    launched = subprocess.Popen([sys.executable, "-c", launcher, *setup.argv()], stdout=subprocess.PIPE)
    out, _ = launched.communicate(timeout=60)
    pid = int(out)
    try:
        assert launched.returncode == 0  # the parent is gone

        async def go() -> None:
            proxy = setup.proxy()
            try:
                await until_ok("the orphaned service answers", proxy.health)
                assert proxy.service_pid == pid
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                assert ppid != launched.pid  # reparented, and still serving
            finally:
                await proxy.close()

        asyncio.run(go())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
