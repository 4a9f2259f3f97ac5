#!/usr/bin/env bash
# Starts the local MariaDB and Redis that the tests use, if they are not running;
# installs them (and promtool) from Debian's packages first on a machine that lacks them.
set -euo pipefail

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v redis-sentinel >/dev/null || need_pkgs+=(redis-sentinel)
[ -x /usr/sbin/mariadbd ] || need_pkgs+=(mariadb-server)
command -v openssl >/dev/null || need_pkgs+=(openssl)
# promtool checks and unit-tests monitoring/alerts.yml (tests/test_alerts.py); only the tool is needed,
# not the Prometheus server's recommends
need_tools=()
command -v promtool >/dev/null || need_tools+=(prometheus)
if [ ${#need_pkgs[@]} -gt 0 ] || [ ${#need_tools[@]} -gt 0 ]; then
    apt-get update -qq
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi
if [ ${#need_tools[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_tools[@]}"
    # the package would also run a Prometheus server where systemd starts services: the tests need none
    if command -v systemctl >/dev/null; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

if ! mariadb -uroot -h127.0.0.1 -P3306 -e 'select 1' >/dev/null 2>&1; then
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi

for _ in $(seq 1 60); do
    if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 \
        && mariadb -uroot -h127.0.0.1 -P3306 -e 'select 1' >/dev/null 2>&1; then
        mariadb -uroot -h127.0.0.1 -P3306 -e 'create database if not exists test'
        exit 0
    fi
    sleep 0.5
done
echo "start-services: MariaDB or Redis did not come up on 127.0.0.1" >&2
exit 1
