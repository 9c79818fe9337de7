#!/usr/bin/env bash
# Builds rewind:local, lays out DIR and starts deploy/docker-compose.yml: three coordinator
# members, then (with a one-time join token each, created by the admin `operator` with
# rewindctl) two agents on a private network.
#
# Usage: deploy/docker/up.sh DIR [release|debug]
#   REWIND_COMPOSE_PROJECT names the compose project (default: rewind).
# Then, from the host:
#   rewindctl --coordinator 127.0.0.1:17441 --tls-dir DIR/tls cluster list
# and to stop: REWIND_COMPOSE_DIR=DIR docker-compose -f deploy/docker-compose.yml -p rewind down
# (`docker compose` with the plugin instead of the v1 binary)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [release|debug]" >&2; exit 64; }
here="$(cd "$(dirname "$0")" && pwd)"
# The compose v1 binary or the `docker compose` plugin, whichever is here.
if docker-compose version >/dev/null 2>&1; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  echo "docker-compose is needed: apt-get install docker-compose (or the docker compose plugin)" >&2
  exit 1
fi
"$here/build-image.sh" "${2:-release}"
"$here/prepare.sh" "$1"
export REWIND_COMPOSE_DIR="$(cd "$1" && pwd)"
dir="$REWIND_COMPOSE_DIR"
# Compose lower-cases a project name; the network is named after it.
project="$(printf '%s' "${REWIND_COMPOSE_PROJECT:-rewind}" | tr '[:upper:]' '[:lower:]')"
"${compose[@]}" -f "$here/../docker-compose.yml" -p "$project" up -d \
  coordinator-1 coordinator-2 coordinator-3
# The members elect a leader and apply the bootstrap policy; until then token creation fails.
for host in web-1 web-2; do
  token=""
  for _ in $(seq 1 60); do
    if token="$(docker run --rm --network "${project}_rewind" -v "$dir:$dir" rewind:local \
        rewindctl --coordinator coordinator-1:7443 --tls-dir "$dir/tls" --identity operator \
        join-token create --kind agent --name "$host" --ttl 10m \
        --reason "compose up" 2>"$dir/join-token.err")"; then
      break
    fi
    token=""
    sleep 1
  done
  if [ -z "$token" ]; then
    echo "error: could not create a join token for $host:" >&2
    cat "$dir/join-token.err" >&2
    exit 1
  fi
  (umask 077 && printf '%s\n' "$token" > "$dir/$host/join-token")
done
rm -f "$dir/join-token.err"
"${compose[@]}" -f "$here/../docker-compose.yml" -p "$project" up -d web-1 web-2
