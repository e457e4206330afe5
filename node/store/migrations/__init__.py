"""The Alembic environment of the node's schema: ``env.py``, ``script.py.mako``, ``versions/``.

Run by ``node.store.migrate`` (no ``alembic.ini``); each file in ``versions/`` is one revision,
named ``NNNN_what.py`` with ``revision = "NNNN"``. A new one: change ``node.store.schema``,
upgrade a scratch database to head, then on a connection to it run
``alembic.command.revision(migrate.alembic_config(connection), message=..., rev_id="NNNN",
autogenerate=True)``, read and complete what it wrote, ``ruff check --fix`` and ``ruff format``.
"""
