"""Alembic migrations of the per-instance databases, run programmatically by the store.

Layout: one Alembic script directory with one *branch* per schema owner:

- ``core``: the store's own tables (fence, changelog, voter_promise, service_state);
  every database has them.
- one branch per component (label = the component's name, e.g. ``kv``), whose first
  revision `depends_on` the first core revision. A component's database is upgraded to
  ``core@head`` and ``<component>@head`` only, so a kv database holds no CLC tables.

New revision (developers)::

    .venv/bin/python -m euca_runtime.migrations revision -m "add x" --head kv@head

There is no alembic.ini: `euca_runtime.store.db.alembic_config()` builds the config.
"""
