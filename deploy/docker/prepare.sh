#!/usr/bin/env bash
# Lays out DIR for deploy/docker-compose.yml: a dev CA, the members' certificates (carrying their
# service name and localhost as SANs) and the issuing CA they sign joins with, one config per
# coordinator member and per agent, and for each agent a sample service root with releases v1
# (healthy) and v2 (its health file says 500), the Capistrano layout the agent manages. Agents
# get no certificate here: up.sh hands each a one-time join token, and the agent makes its own
# key. Agents see only their own directory and DIR/public (the CA certificate). Certificates are
# issued by the image's own rewind-coordinator, so only docker is needed.
# tests/tests/t07_compose.rs drives what this makes.
#
# Usage: deploy/docker/prepare.sh DIR        (DIR must be empty or absent)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 64; }
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
if [ -n "$(ls -A "$dir")" ]; then
  echo "error: $dir is not empty" >&2
  exit 64
fi

issue() { # kind name [--member-id N] [--san SAN...]
  local kind="$1" name="$2"; shift 2
  docker run --rm -v "$dir:$dir" rewind:local \
    rewind-coordinator issue-cert --create-ca --data-dir "$dir" --kind "$kind" --name "$name" "$@" >/dev/null
}

# Who may do what: the dev CA's `operator` (a user certificate) administers this cluster.
cat > "$dir/policy.toml" <<TOML
[[binding]]
name = "operator-admin"
role = "admin"
identities = ["user:operator"]
scopes = ["*"]

# What Alertmanager and signed webhooks act as: they may roll back anything.
[[binding]]
name = "monitoring"
role = "operator"
identities = ["automation:alertmanager", "automation:webhook"]
scopes = ["*"]
TOML

docker run --rm -v "$dir:$dir" rewind:local \
  rewind-coordinator issue-issuing-ca --create-ca --data-dir "$dir" >/dev/null
mkdir -p "$dir/public"
cp "$dir/tls/ca.pem" "$dir/public/ca.pem"

members=""
for id in 1 2 3; do
  members+="
[[cluster.member]]
id = $id
address = \"coordinator-$id:7443\"
region = \"region-$id\"
"
done

for id in 1 2 3; do
  issue member "coordinator-$id" --member-id "$id" --san "coordinator-$id" --san localhost --san 127.0.0.1
  cat > "$dir/coordinator-$id.toml" <<TOML
listen = "0.0.0.0:7443"
data-dir = "/var/lib/rewind/coordinator"
[tls]
ca = "$dir/tls/ca.pem"
cert = "$dir/tls/coordinator-$id.pem"
key = "$dir/tls/coordinator-$id.key"
[engine]
step-timeout-s = 5
verify-timeout-s = 20
tick-ms = 100
[health]
report-interval-ms = 500
window-s = 3
[access]
bootstrap-policy-file = "$dir/policy.toml"
[issuer]
cert = "$dir/tls/issuer.pem"
key = "$dir/tls/issuer.key"
[cluster]
id = "compose"
member-id = $id
$members
TOML
done

for host in web-1 web-2; do
  root="$dir/$host/srv/web"
  for version in v1 v2; do
    mkdir -p "$root/releases/$version"
    printf '%s' "$version" > "$root/releases/$version/VERSION"
  done
  printf '200' > "$root/releases/v1/health_status"
  printf '500' > "$root/releases/v2/health_status"
  mkdir -p "$root/config"
  # What v1's deploy tool writes (the test checks a rollback restores exactly these bytes).
  printf '# config of v1\nworkers = 8\n' > "$root/config/app.toml"
  cat > "$dir/$host/agent.toml" <<TOML
host-id = "$host"
coordinators = ["coordinator-1:7443", "coordinator-2:7443", "coordinator-3:7443"]
data-dir = "/var/lib/rewind/agent"
health-interval-ms = 500
# Written by up.sh once the members run; the agent joins with it on first start.
join-token-file = "$dir/$host/join-token"
[tls]
ca = "$dir/public/ca.pem"
cert = "$dir/$host/tls/$host.pem"
key = "$dir/$host/tls/$host.key"
[labels]
region = "region-1"
[[service]]
name = "web"
root = "$root"
config-files = ["config/app.toml"]
restart-command = ["sh", "-c", "echo restarted >> $root/restarts"]
[[service.probe]]
name = "health-file"
command = ["grep", "-q", "200", "$root/current/health_status"]
timeout-ms = 2000
TOML
done
echo "prepared $dir"
