# Real Redis topologies (sentinel, cluster, TLS, ACL) started by fixtures on loopback ports;
# a database of its own per MySQL test module.
pytest_plugins = ["tests.redis_fixtures", "tests.mysql_fixtures"]
