"""codecage beyond one machine (docs/cluster.md).

postgres.py  a PostgreSQL server on this machine for the audit log (`codecage cluster
             up`, the tests)
"""
