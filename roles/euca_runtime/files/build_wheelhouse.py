"""Build the runtime's wheelhouse on the controller, only when the project changed.

Usage: build_wheelhouse.py {head|worktree} PROJECT_DIR WHEELHOUSE_DIR [PIP_ARGS...]

`head` builds what is committed (git HEAD of PROJECT_DIR), so edits in progress in the
checkout never reach hosts and the build is the same on every run until the next commit
that touches the runtime; its fingerprint is the git object ids of the runtime package and
the packaging files. `worktree` builds the files as they are; its fingerprint is a SHA-256
over the packaging files and every file of the runtime package (names and bytes). When it
equals the one stored in
WHEELHOUSE_DIR/.fingerprint nothing happens and "unchanged" is printed; otherwise
`pip wheel` of the project, with its pinned runtime dependencies (constraints.txt), goes
into a fresh directory that then replaces WHEELHOUSE_DIR, and "rebuilt" is printed.
With EUCA_WHEELHOUSE_CHECK set in the environment it only prints "stale" instead.
The wheelhouse also holds WHEELHOUSE_DIR/wheelhouse.tar, the same wheels and .fingerprint as
one file, which the role copies to a host in one transfer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGING = ("pyproject.toml", "constraints.txt", "setup.cfg", "setup.py", "MANIFEST.in")
PACKAGE = "euca_runtime"
SKIP = {"__pycache__", ".mypy_cache", ".pytest_cache"}


def fingerprint(project: Path) -> str:
    h = hashlib.sha256()
    files = [project / name for name in PACKAGING if (project / name).is_file()]
    files += sorted(
        p
        for p in (project / PACKAGE).rglob("*")
        if p.is_file() and not SKIP.intersection(p.parts) and p.suffix not in (".pyc", ".pyo")
    )
    for path in files:
        h.update(str(path.relative_to(project)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def git(project: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def head_fingerprint(project: Path) -> str:
    paths = [PACKAGE, *(n for n in (*PACKAGING, "README.md") if git(project, "ls-tree", "HEAD", n))]
    ids = [f"{p}={git(project, 'rev-parse', f'HEAD:{p}')}" for p in paths]
    return "head:" + hashlib.sha256("\n".join(ids).encode()).hexdigest()


def export_head(project: Path, dest: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(project), "archive", "--format=tar", "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


ARCHIVE = "wheelhouse.tar"
"""The wheelhouse as one file (the wheels and .fingerprint): hosts get it in one transfer."""


def write_archive(wheelhouse: Path) -> None:
    members = [*sorted(p.name for p in wheelhouse.iterdir() if p.suffix == ".whl"), ".fingerprint"]
    tmp = wheelhouse / f".{ARCHIVE}.tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in members:
            info = tar.gettarinfo(wheelhouse / name, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with (wheelhouse / name).open("rb") as f:
                tar.addfile(info, f)
    tmp.rename(wheelhouse / ARCHIVE)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[1] not in ("head", "worktree"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, project, wheelhouse = argv[1], Path(argv[2]).resolve(), Path(argv[3])
    pip_args = argv[4:]
    digest = head_fingerprint(project) if mode == "head" else fingerprint(project)
    stamp = wheelhouse / ".fingerprint"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        if not (wheelhouse / ARCHIVE).is_file() and not os.environ.get("EUCA_WHEELHOUSE_CHECK"):
            write_archive(wheelhouse)  # a wheelhouse built before the archive existed
        print("unchanged")
        return 0
    if os.environ.get("EUCA_WHEELHOUSE_CHECK"):  # ansible-playbook --check: say, do not build
        print("stale")
        return 0
    wheelhouse.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=wheelhouse.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="euca-wheel-src-") as src:
            # Build from a copy, so the project's tree gets no build/ or egg-info from us.
            if mode == "head":
                export_head(project, Path(src))
            else:
                for name in (*PACKAGING, "README.md", "LICENSE"):
                    if (project / name).is_file():
                        shutil.copy2(project / name, Path(src) / name)
                ignore = shutil.ignore_patterns(*SKIP, "*.pyc", "*.egg-info", "build", "dist")
                shutil.copytree(project / PACKAGE, Path(src) / PACKAGE, ignore=ignore)
            cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(fresh)]
            constraints = Path(src) / "constraints.txt"
            if constraints.is_file():
                cmd += ["--constraint", str(constraints)]
            subprocess.run([*cmd, *pip_args, src], check=True, stdout=sys.stderr)
        (fresh / ".fingerprint").write_text(digest + "\n")
        write_archive(fresh)
        if wheelhouse.exists():
            shutil.rmtree(wheelhouse)
        fresh.rename(wheelhouse)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    print("rebuilt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
