#!/usr/bin/env bash
# The cluster's MLflow tracking server, on the head node, inside its Ray container:
# PostgreSQL backend (never SQLite on NFS: many trials write at once), artifacts proxied by the
# server to EFS or S3, MLflow's basic-auth app, listening on the head's private address only.
# cluster.yaml runs `bash ~/mtcae/cluster/mlflow_server.sh restart` in head_start_ray_commands.
#
#   mlflow_server.sh start | stop | restart | status
#
# `stop` ends exactly the server `start` started: its process group, whose id `start` records in a
# pidfile (checked against /proc before it is signalled). Never `pkill -f "mlflow server"`: Ray runs
# each command as `bash -c '<command>'`, so the pattern also matches -- and kills -- that shell.
#
# Settings: the environment, else KEY=VALUE lines in $MTCAE_SECRETS/mlflow.env, else these defaults.
#   MTCAE_SHARED                  shared folder (EFS)                      /mnt/efs/mtcae
#   MTCAE_SECRETS                 secrets cluster.yaml generates, mode 700 $MTCAE_SHARED/secrets
#   MLFLOW_BACKEND_STORE_URI      postgresql://mlflow:<secrets/postgres_password>@127.0.0.1:5432/mlflow
#                                 (the head's PostgreSQL container; or a managed instance, e.g. RDS)
#   MLFLOW_AUTH_DATABASE_URI      the same server's database mlflow_auth (basic-auth users)
#   MLFLOW_ARTIFACTS_DESTINATION  $MTCAE_SHARED/mlflow/artifacts, or s3://BUCKET/mlflow-artifacts
#   MLFLOW_AUTH_ADMIN_USERNAME    admin; the password is secrets/mlflow_admin_password
#   MLFLOW_FLASK_SERVER_SECRET_KEY  basic-auth's CSRF key                secrets/mlflow_flask_secret_key
#   MLFLOW_HOST                   the head's private address (the first of `hostname -I`)
#   MLFLOW_PORT                   5000
#   MLFLOW_WORKERS                4
#   MLFLOW_RUN_DIR                pidfile, log, auth config (local disk)   /tmp/mtcae-mlflow
#   MLFLOW_START_TIMEOUT          seconds to wait for /health              180
set -euo pipefail

load_settings() {
    MTCAE_SHARED=${MTCAE_SHARED:-/mnt/efs/mtcae}
    MTCAE_SECRETS=${MTCAE_SECRETS:-$MTCAE_SHARED/secrets}
    local file="$MTCAE_SECRETS/mlflow.env" key value
    if [[ -f $file ]]; then
        while IFS='=' read -r key value; do
            [[ -z $key || $key == \#* ]] && continue
            [[ -n ${!key:-} ]] || export "$key=$value"
        done < "$file"
    fi
    if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} || -z ${MLFLOW_AUTH_DATABASE_URI:-} ]]; then
        local password  # a separate assignment, so that a missing secret stops the script
        password=$(secret postgres_password)
        MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-postgresql://mlflow:$password@127.0.0.1:5432/mlflow}
        MLFLOW_AUTH_DATABASE_URI=${MLFLOW_AUTH_DATABASE_URI:-postgresql://mlflow:$password@127.0.0.1:5432/mlflow_auth}
    fi
    [[ -n ${MLFLOW_AUTH_ADMIN_PASSWORD:-} ]] || MLFLOW_AUTH_ADMIN_PASSWORD=$(secret mlflow_admin_password)
    # basic-auth's CSRF protection; one key for all the server's workers.
    [[ -n ${MLFLOW_FLASK_SERVER_SECRET_KEY:-} ]] || MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret mlflow_flask_secret_key)
    # The server reads these from the environment: no password on its command line (ps).
    export MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    export MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS_DESTINATION:-$MTCAE_SHARED/mlflow/artifacts}
    export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
    MLFLOW_HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
    MLFLOW_PORT=${MLFLOW_PORT:-5000}
    MLFLOW_WORKERS=${MLFLOW_WORKERS:-4}
    MLFLOW_RUN_DIR=${MLFLOW_RUN_DIR:-/tmp/mtcae-mlflow}
    MLFLOW_START_TIMEOUT=${MLFLOW_START_TIMEOUT:-180}
    PIDFILE=$MLFLOW_RUN_DIR/server.pid
    LOG=$MLFLOW_RUN_DIR/server.log
}

secret() {  # the contents of $MTCAE_SECRETS/<name>, or an error naming the file
    local path="$MTCAE_SECRETS/$1"
    [[ -s $path ]] || { echo "mlflow_server.sh: missing secret $path (cluster.yaml creates it)" >&2; exit 1; }
    tr -d '\n' < "$path"
}

server_pid() {  # the recorded process group id, if that process is still our mlflow server
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(cat "$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q mlflow || return 1
    echo "$pid"
}

# basic-auth settings; the admin password comes from the environment. The credential cache: without
# it every request (each trial logs every epoch) pays a PBKDF2 hash; its staleness window only
# matters when passwords change, and the one user here is the generated admin.
write_auth_config() {
    (umask 077; cat > "$MLFLOW_RUN_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = $MLFLOW_AUTH_ADMIN_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
EOF
    )
    export MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_RUN_DIR/basic_auth.ini
}

wait_healthy() {
    local url="http://$MLFLOW_HOST:$MLFLOW_PORT/health" deadline=$((SECONDS + MLFLOW_START_TIMEOUT))
    until python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$url" 2>/dev/null; do
        if ! server_pid > /dev/null || ((SECONDS > deadline)); then
            echo "mlflow_server.sh: the server did not come up at $url; the end of $LOG:" >&2
            tail -n 40 "$LOG" >&2 || true
            return 1
        fi
        sleep 1
    done
    echo "mlflow_server.sh: MLflow is up at http://$MLFLOW_HOST:$MLFLOW_PORT (pid $(cat "$PIDFILE"), log $LOG)"
}

start() {
    if server_pid > /dev/null; then
        echo "mlflow_server.sh: already running (pid $(cat "$PIDFILE"))"
        return 0
    fi
    mkdir -p "$MLFLOW_RUN_DIR" && chmod 700 "$MLFLOW_RUN_DIR"
    case $MLFLOW_ARTIFACTS_DESTINATION in *://*) ;; *) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;; esac
    write_auth_config
    rm -f "$PIDFILE"
    # setsid: the server gets its own process group, which `stop` signals as a whole (the mlflow
    # CLI runs uvicorn as a child, which runs the workers). The inner shell records its own pid,
    # the group's id, then becomes the server.
    echo "mlflow_server.sh: starting mlflow server on $MLFLOW_HOST:$MLFLOW_PORT"
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$PIDFILE" \
        mlflow server --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        --serve-artifacts --app-name basic-auth > "$LOG" 2>&1 < /dev/null &
    local waited=0
    until [[ -s $PIDFILE ]] || ((waited > 50)); do sleep 0.1; waited=$((waited + 1)); done
    wait_healthy
}

stop() {
    local pid
    if ! pid=$(server_pid); then
        rm -f "$PIDFILE"
        echo "mlflow_server.sh: not running"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || true
    local waited=0
    while kill -0 -- "-$pid" 2>/dev/null && ((waited < 300)); do sleep 0.1; waited=$((waited + 1)); done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    echo "mlflow_server.sh: stopped (pid $pid)"
}

load_settings
case ${1:-} in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    status) if pid=$(server_pid); then echo "running (pid $pid)"; else echo "not running"; exit 3; fi ;;
    *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
