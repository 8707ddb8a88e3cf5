"""The store's core tests against a real PostgreSQL.

A throwaway cluster is created for this module (initdb into a temporary directory, owned
by the `postgres` user when running as root, listening only on a unix socket inside that
directory) and is stopped and removed at teardown, also when a test or the start-up
fails. Every test of `tests/unit/test_store.py` except the `test_sqlite_*` ones runs here
with `new_db_url` handing out fresh databases of that cluster.

Skips (with the reason) when the psycopg driver or the PostgreSQL server binaries are
missing.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

UNIT_DIR = Path(__file__).resolve().parents[1] / "unit"
PG_DRIVER_PIN = "psycopg[binary]==3.3.9"


def _load_core_tests() -> Any:
    """Import tests/unit/test_store.py (assertion rewriting on) to reuse its tests."""
    if str(UNIT_DIR) not in sys.path:
        sys.path.insert(0, str(UNIT_DIR))
    if "test_store" not in sys.modules:
        pytest.register_assert_rewrite("test_store")
    module = importlib.import_module("test_store")
    if Path(module.__file__ or "").resolve() != UNIT_DIR / "test_store.py":
        raise RuntimeError(f"imported the wrong test_store module: {module.__file__}")
    return module


_core = _load_core_tests()
for _name, _value in vars(_core).items():
    if (_name.startswith("test_") and not _name.startswith("test_sqlite_")) or _name == "open_store":
        globals()[_name] = _value


def _pg_bindir() -> Path | None:
    candidates = [os.environ.get("EUCA_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _version_key(path: str) -> int:
    m = re.search(r"/(\d+)/bin$", path)
    return int(m.group(1)) if m else 0


class _Cluster:
    """A PostgreSQL cluster in a temporary directory, run as `postgres` when we are root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="euca-store-pg-"))
        self.data = self.dir / "data"
        self.port = 5432  # only names the socket file: there is no TCP listener
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.dir)}
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **kwargs,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return proc

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = " ".join(
            [
                f"-k {self.dir} -p {self.port}",
                "-c listen_addresses=''",  # unix socket only
                "-c fsync=off -c full_page_writes=off",  # throwaway data: speed over durability
                "-c max_connections=400",  # hypothesis examples keep many stores open at once
            ]
        )
        self.started = True  # from here on teardown must try to stop it
        log_file = str(self.dir / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log_file, "-w", "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        if self.started and (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """Last resort: SIGKILL the postmaster this fixture started (its pid file names it)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}&port={self.port}"

    def log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text()[-4000:]
        except OSError:
            return ""


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[_Cluster]:
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip(f"PostgreSQL driver not installed: add {PG_DRIVER_PIN} to run the PostgreSQL store tests")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; set EUCA_PG_BIN")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    cluster = _Cluster(bindir)
    try:
        try:
            cluster.start()
        except RuntimeError as exc:
            pytest.fail(f"could not start the throwaway PostgreSQL: {exc}\n{cluster.log_tail()}")
        yield cluster
    finally:
        cluster.stop()


_test_ids = itertools.count()


@pytest.fixture
def new_db_url(pg_cluster: _Cluster) -> Iterator[Callable[[str | None], str]]:
    """Fresh databases in the throwaway cluster; a given name maps to the same database."""
    import sqlalchemy as sa

    prefix = f"t{next(_test_ids)}"
    fresh = itertools.count()
    made: dict[str, str] = {}
    admin = sa.create_engine(pg_cluster.url("postgres"), isolation_level="AUTOCOMMIT")

    def make(name: str | None = None) -> str:
        key = name or f"fresh{next(fresh)}"
        if key not in made:
            db = re.sub(r"[^a-z0-9_]", "_", f"{prefix}_{key}".lower())[:60]
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{db}"')
            made[key] = pg_cluster.url(db)
        return made[key]

    try:
        yield make
    finally:
        admin.dispose()


def test_cluster_is_postgres(new_db_url: Callable[[str | None], str]) -> None:
    from euca_runtime.store import Store

    store = Store.open(new_db_url("probe"), "kv")
    try:
        assert store.engine.dialect.name == "postgresql"
        assert store.engine.dialect.driver == "psycopg"
    finally:
        store.close()
