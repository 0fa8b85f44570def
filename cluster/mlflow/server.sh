#!/usr/bin/env bash
# MLflow tracking server for a Ray cluster: a database backend store, artifacts proxied by the
# server to object storage (clients need no bucket credentials), bound to a private address.
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
#   MLFLOW_ALLOWED_HOSTS  --allowed-hosts: Host headers to accept. MLflow's default is
#                         localhost + private IPs; clients that use a DNS name (a Kubernetes
#                         Service, say) need it listed, e.g. "mlflow:*,10.*,localhost:*"
#
#   MLFLOW_BACKEND_URI=postgresql://mlflow:secret@10.0.1.40:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow cluster/mlflow/server.sh
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

backend="${MLFLOW_BACKEND_URI:-sqlite:///$HOME/mlflow/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS:-$HOME/mlflow/artifacts}"
host="${MLFLOW_HOST:-$(private_ip)}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"

all_interfaces=0
[[ "$host" == "0.0.0.0" || "$host" == "::" ]] && all_interfaces=1
if [[ $all_interfaces == 1 && "${MLFLOW_ALLOW_ALL_INTERFACES:-0}" != 1 ]]; then
  echo "server.sh: refusing to bind $host (every interface); set MLFLOW_HOST to a private" \
    "address, or MLFLOW_ALLOW_ALL_INTERFACES=1 behind a firewall" >&2
  exit 2
fi
if [[ "$backend" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
fi

args=(
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"
  --serve-artifacts
  --host "$host"
  --port "$port"
  --workers "$workers"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo "server.sh: MLflow on http://$host:$port (backend ${backend%%://*}, artifacts $artifacts)" >&2
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}"
