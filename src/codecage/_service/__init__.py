"""The service, `codecage serve` (the `codecage[service]` extra); see docs/architecture.md.

    app.py      the FastAPI app: routers, authentication and admission, body limits, NDJSON
    manager.py  the Manager: tenants' sandboxes, quotas, an audit record around every operation
    audit.py    the audit log: what a record holds, one group-commit writer
    db.py       its database: SQLite (WAL, synchronous=FULL) or PostgreSQL (psycopg 3)
    config.py   ServerConfig and Quotas (`--config service.toml`)

Importing the SDK (`import codecage`) never imports this package.
"""
