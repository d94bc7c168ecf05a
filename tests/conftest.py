"""Fixtures shared by the whole suite: real services, each started on a free port."""

# Fixture modules: `mosquitto`, `postgres_server`/`postgres_url`, `victoria`, and `db_url`
# (SQLite and PostgreSQL), which the fleet and end-to-end tests request.
pytest_plugins = [
    "tests.services.mosquitto",
    "tests.services.postgres",
    "tests.services.victoria",
    "tests.services.databases",
]
