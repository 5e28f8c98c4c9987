#!/usr/bin/env bash
# Make a local Debian slim Python base image with debootstrap + `podman import`, for machines
# that cannot pull docker.io/library/python:*-slim. Usage (root):
#   init/image/build-base.sh [IMAGE] [SUITE]
# IMAGE defaults to localhost/appliance-base:bookworm, SUITE to bookworm. The mirror is
# $DEBIAN_MIRROR or the first deb.debian.org-style URI in /etc/apt/sources.list.d/*.sources.
# Skips the work when IMAGE already exists (set FORCE=1 to rebuild).
set -euo pipefail
image=${1:-localhost/appliance-base:bookworm}
suite=${2:-bookworm}

if [ "${FORCE:-0}" != 1 ] && podman image exists "$image"; then
  echo "build-base: $image exists (FORCE=1 to rebuild)"
  exit 0
fi
for tool in debootstrap podman tar; do
  command -v "$tool" >/dev/null || { echo "build-base: $tool not found (apt-get install $tool)" >&2; exit 4; }
done
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | grep -v security | head -n1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d /var/tmp/appliance-base.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT
echo "build-base: debootstrap $suite from $mirror into $root"
# minbase + the interpreter and venv support: the same shape as python:3.11-slim, with
# Debian's python3 at /usr/bin/python3 instead of /usr/local/bin/python.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$root" "$mirror" >/dev/null
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
tar --numeric-owner -C "$root" -c . \
  | podman import --change 'CMD ["/usr/bin/python3"]' \
      --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null
echo "build-base: $image ready"
