"""Migration scripts (Alembic skips this file). Revision ids: `<branch>_<NNNN>`."""
