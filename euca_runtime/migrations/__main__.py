"""Developer entry point: run an Alembic command against this package's scripts.

``python -m euca_runtime.migrations revision -m "add column" --head kv@head``
(`--url` selects a database for commands that need one, e.g. `current`).
"""

from __future__ import annotations

import sys

from alembic.config import CommandLine

from euca_runtime.store.db import alembic_config


def main(argv: list[str] | None = None) -> None:
    """Run `alembic` with the package's script location and an optional --url."""
    args = list(sys.argv[1:] if argv is None else argv)
    url = None
    if "--url" in args:
        i = args.index("--url")
        url = args[i + 1]
        del args[i : i + 2]
    cli = CommandLine(prog="python -m euca_runtime.migrations")
    options = cli.parser.parse_args(args)
    cfg = alembic_config(url)
    cli.run_cmd(cfg, options)


if __name__ == "__main__":
    main()
