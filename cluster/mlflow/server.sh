#!/usr/bin/env bash
# MLflow tracking server for a Ray cluster: a database backend store, artifacts proxied by the
# server to object storage (clients need no bucket credentials), bound to a private address,
# with MLflow's basic authentication whenever it listens beyond loopback.
# See cluster/mlflow/README.md. Settings come from the environment:
#
#   MLFLOW_BACKEND_URI    postgresql://user:pass@host:5432/mlflow (durable, many writers) or
#                         sqlite:////abs/path/mlflow.db (one machine)
#                         default: sqlite:///$HOME/mlflow/mlflow.db
#   MLFLOW_ARTIFACTS      --artifacts-destination: s3://bucket/mlflow, gs://bucket/mlflow or a
#                         local folder; default: $HOME/mlflow/artifacts
#   MLFLOW_HOST           address to bind; default: this machine's first private (RFC 1918)
#                         address, else 127.0.0.1. 0.0.0.0 is refused unless
#                         MLFLOW_ALLOW_ALL_INTERFACES=1 (put a firewall or proxy in front).
#   MLFLOW_PORT           default 5000
#   MLFLOW_WORKERS        server worker processes, default 2
#   MLFLOW_ALLOWED_HOSTS  --allowed-hosts: Host headers to accept; default: the bound address
#                         and localhost (with any port). Clients that use a DNS name (a
#                         Kubernetes Service, say) need it listed, e.g. "mlflow,mlflow:*";
#                         so do the clients of a server bound to 0.0.0.0
#
# Authentication (`mlflow server --app-name basic-auth`) is on whenever MLFLOW_HOST is not a
# loopback address (127.*, localhost, ::1), and on loopback too with MLFLOW_AUTH=1. It needs:
#
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password (>= 12 characters); creates the admin
#                                   user on the first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  a random string, the same across restarts (CSRF tokens)
#   MLFLOW_AUTH_ADMIN_USERNAME      default admin
#   MLFLOW_AUTH_DB_URI              where users and permissions live; default: the backend
#                                   database (own tables), or basic_auth.db beside a sqlite one
#   MLFLOW_AUTH_CONFIG_PATH         your own auth .ini instead of the one written here
#
# Clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or
# ~/.mlflow/credentials).
#
#   MLFLOW_BACKEND_URI=postgresql://mlflow:secret@10.0.1.40:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow MLFLOW_AUTH_ADMIN_PASSWORD=... \
#   MLFLOW_FLASK_SERVER_SECRET_KEY=... cluster/mlflow/server.sh
set -euo pipefail

private_ip() {
  local ip
  for ip in $(hostname -I 2>/dev/null || true); do
    case "$ip" in
      10.* | 192.168.* | 172.1[6-9].* | 172.2[0-9].* | 172.3[01].*)
        echo "$ip"
        return
        ;;
    esac
  done
  echo 127.0.0.1
}

die() {
  echo "server.sh: $*" >&2
  exit 2
}

backend="${MLFLOW_BACKEND_URI:-sqlite:///$HOME/mlflow/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS:-$HOME/mlflow/artifacts}"
host="${MLFLOW_HOST:-$(private_ip)}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"

all_interfaces=0
[[ "$host" == "0.0.0.0" || "$host" == "::" ]] && all_interfaces=1
if [[ $all_interfaces == 1 && "${MLFLOW_ALLOW_ALL_INTERFACES:-0}" != 1 ]]; then
  die "refusing to bind $host (every interface); set MLFLOW_HOST to a private" \
    "address, or MLFLOW_ALLOW_ALL_INTERFACES=1 behind a firewall"
fi

case "$host" in
  127.* | localhost | ::1) loopback=1 ;;
  *) loopback=0 ;;
esac
case "${MLFLOW_AUTH:-auto}" in
  auto) auth=$((1 - loopback)) ;;
  1) auth=1 ;;
  *) die "MLFLOW_AUTH=${MLFLOW_AUTH} is not understood: leave it unset (auth beyond loopback)" \
    "or set 1 (auth on loopback too)" ;;
esac
if [[ $auth == 1 ]]; then
  password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
  [[ ${#password} -ge 12 ]] ||
    die "MLflow on $host needs basic auth: set MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or" \
      "more) and MLFLOW_FLASK_SERVER_SECRET_KEY"
  [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] ||
    die "MLflow on $host needs basic auth: set MLFLOW_FLASK_SERVER_SECRET_KEY (a random" \
      "string, the same on every restart)"
fi

if [[ "$backend" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
fi

# Host headers: the bound address (IPv6 in brackets; fnmatch needs "[" escaped) and localhost
if [[ "$host" == *:* ]]; then
  own="[$host],[[]$host]:*"
else
  own="$host,$host:*"
fi
for name in "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*"; do
  [[ ",$own," == *",$name,"* ]] || own+=",$name"
done
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-$own}"

args=(
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"
  --serve-artifacts
  --host "$host"
  --port "$port"
  --workers "$workers"
  --allowed-hosts "$allowed_hosts"
)
mode="no auth: loopback only"
if [[ $auth == 1 ]]; then
  if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
    if [[ "$backend" == sqlite:///* ]]; then
      auth_db="sqlite:///$(dirname "${backend#sqlite:///}")/basic_auth.db"
    else
      auth_db="$backend"
    fi
    auth_db="${MLFLOW_AUTH_DB_URI:-$auth_db}"
    mkdir -p "$HOME/mlflow"
    export MLFLOW_AUTH_CONFIG_PATH="$HOME/mlflow/basic_auth.ini"
    # the database URI may hold a password: owner-only (the admin password stays in the env);
    # "%" doubled for configparser
    (
      umask 077
      cat >"$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = ${auth_db//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    )
  fi
  args+=(--app-name basic-auth)
  mode="basic auth, admin ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
fi
echo "server.sh: MLflow on http://$host:$port ($mode; backend ${backend%%://*}," \
  "artifacts $artifacts)" >&2
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}"
