#!/usr/bin/env bash
# Builds rewind:local, lays out DIR and starts deploy/docker-compose.yml: three coordinator
# members and two agents on a private network.
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
"${compose[@]}" -f "$here/../docker-compose.yml" -p "${REWIND_COMPOSE_PROJECT:-rewind}" up -d
