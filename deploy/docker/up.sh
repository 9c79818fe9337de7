#!/usr/bin/env bash
# Builds rewind:local, lays out DIR and starts deploy/docker-compose.yml: three coordinator
# members and two agents on a private network.
#
# Usage: deploy/docker/up.sh DIR [release|debug]
#   REWIND_COMPOSE_PROJECT names the compose project (default: rewind).
# Then, from the host:
#   rewindctl --coordinator 127.0.0.1:17441 --tls-dir DIR/tls cluster list
# and to stop: REWIND_COMPOSE_DIR=DIR docker-compose -f deploy/docker-compose.yml -p rewind down
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [release|debug]" >&2; exit 64; }
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build-image.sh" "${2:-release}"
"$here/prepare.sh" "$1"
export REWIND_COMPOSE_DIR="$(cd "$1" && pwd)"
docker-compose -f "$here/../docker-compose.yml" -p "${REWIND_COMPOSE_PROJECT:-rewind}" up -d
