"""Postgres side: schema, migrations, repositories, SQL functions, embedded server."""
