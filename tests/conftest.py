# Real Redis topologies (sentinel, cluster, TLS, ACL) started by fixtures on loopback ports.
pytest_plugins = ["tests.redis_fixtures"]
