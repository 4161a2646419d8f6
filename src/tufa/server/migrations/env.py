"""Alembic environment: runs on the connection the server hands over (see db.migrate)."""

from alembic import context

from tufa.server.db import schema

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=schema, render_as_batch=True)
context.run_migrations()
