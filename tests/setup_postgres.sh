#!/usr/bin/env bash
# PostgreSQL server binaries for tests/test_tracking_postgres.py (the cluster's MLflow backend, run
# against a real server on loopback). .ci/run and the README's test command run this first.
#
# Nothing to do when initdb is on PATH or in /usr/lib/postgresql/*/bin. Otherwise, as root with
# apt (CI: a fresh Debian/Ubuntu machine), installs the distribution's `postgresql` package without
# creating or starting its default cluster: the test starts its own server and stops it by PID.
# Anywhere else it says why not and exits 0; the test then skips (and fails under CI=true).
set -euo pipefail
if command -v initdb > /dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get > /dev/null; then
    echo "setup_postgres.sh: no PostgreSQL found, and installing it needs root and apt-get;" \
         "the PostgreSQL tracking tests will skip" >&2
    exit 0
fi
# postgresql-common reads this before it would create (and start) the `main` cluster; the existing
# file is kept over the package's copy (--force-confold).
if [[ ! -e /etc/postgresql-common/createcluster.conf ]]; then
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold postgresql > /dev/null
echo "setup_postgres.sh: installed $(ls -d /usr/lib/postgresql/*/bin | tail -n 1)"
