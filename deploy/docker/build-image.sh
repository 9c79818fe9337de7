#!/usr/bin/env bash
# Builds the image `rewind:local` without pulling anything: FROM scratch, holding the three
# binaries, every shared library they load (found with ldd), sh + grep for the agents' hook
# and probe commands, and the docker CLI (for an agent managing containers through the host's
# docker socket). The normal way, where a registry is reachable, is Dockerfile.debian.
#
# Usage: deploy/docker/build-image.sh [release|debug]      (default: release)
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${1:-release}"
case "$profile" in
  release) cargo build --release --bin rewind-coordinator --bin rewind-agent --bin rewindctl ;;
  # Debug builds carry the crash points, as the tests build them (rewind_shared::failpoint::
  # BUILD_FEATURES), so building an image does not replace the tests' binaries with others.
  debug) cargo build --features rewind-coordinator/failpoints,rewind-agent/failpoints \
    --bin rewind-coordinator --bin rewind-agent --bin rewindctl ;;
  *) echo "usage: $0 [release|debug]" >&2; exit 64 ;;
esac

rootfs=target/docker-rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/bin" "$rootfs/tmp" "$rootfs/var/lib/rewind" "$rootfs/etc"
chmod 1777 "$rootfs/tmp"
for binary in rewind-coordinator rewind-agent rewindctl; do
  # Debug info is most of a debug build's size; the image does not need it.
  objcopy --strip-debug "target/$profile/$binary" "$rootfs/usr/local/bin/$binary"
done
cp /bin/dash "$rootfs/bin/sh"
cp /bin/grep "$rootfs/bin/grep"
# The docker CLI, when this machine has one: an agent running as a container on a container
# host restarts and inspects the service containers through the mounted docker socket.
if command -v docker >/dev/null; then
  cp "$(command -v docker)" "$rootfs/bin/docker"
fi

# Each library at the path the dynamic loader will look for it.
for executable in "$rootfs"/usr/local/bin/* "$rootfs"/bin/*; do
  # A static executable (the docker CLI is one) has no libraries to copy.
  { ldd "$executable" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r library; do
  mkdir -p "$rootfs$(dirname "$library")"
  cp -L "$library" "$rootfs$library"
done
echo "root:x:0:0:root:/:/bin/sh" > "$rootfs/etc/passwd"

docker build --quiet -t rewind:local -f deploy/docker/Dockerfile.scratch "$rootfs" >/dev/null
echo "built rewind:local ($profile binaries)"
