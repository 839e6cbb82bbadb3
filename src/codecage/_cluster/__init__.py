"""codecage beyond one machine (docs/cluster.md): Ray places the work and carries the calls,
PostgreSQL keeps the audit log.

    node.py      NodeHost: the Ray actor on each sandbox node, running the service's app
                 there (its Manager, jail, pools, quotas, audit writer)
    frontend.py  `codecage serve --cluster`: a stateless front end (admission, routing by
                 the sandbox id's node prefix, placement, listings, batch, lost nodes)
    local.py     `codecage cluster up/down/status`: a real cluster on this machine
    postgres.py  a PostgreSQL server on this machine for the audit log
"""
