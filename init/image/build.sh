#!/usr/bin/env bash
# Build the appliance image with podman from a clean copy of the sources. Usage (root):
#   init/image/build.sh [IMAGE]            IMAGE defaults to localhost/appliance:dev
# Environment:
#   BASE      base image (default: localhost/appliance-base:bookworm, made on demand by
#             build-base.sh when it is missing; any Debian slim Python image works)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_CERT
#             the pip settings the build uses; unset ones are read from `pip config`.
#             file:// indexes are dropped (they do not exist inside the build).
#             PIP_CERT (a CA bundle file) goes in as a build secret, not a layer.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
image=${1:-localhost/appliance:dev}
base=${BASE:-localhost/appliance-base:bookworm}

command -v podman >/dev/null || { echo "build: podman not found (apt-get install podman)" >&2; exit 4; }
if [[ $base == localhost/appliance-base:* ]] && ! podman image exists "$base"; then
  "$here/build-base.sh" "$base"
fi

pipconf() {  # pipconf NAME: the env value, else pip's configured value, else empty
  local env=PIP_${1^^}; env=${env//-/_}
  if [ -n "${!env:-}" ]; then echo "${!env}"; return; fi
  python3 -m pip config get "global.$1" 2>/dev/null || true
}
keep_http() { tr ' ' '\n' | grep -E '^https?://' | paste -sd' ' || true; }
index=$(pipconf index-url | keep_http)
extra=$(pipconf extra-index-url | keep_http)
trusted=$(pipconf trusted-host)
cert=$(pipconf cert)

ctx=$(mktemp -d /var/tmp/appliance-ctx.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
# Only what the Containerfile copies: no .venv, .git or caches in the build context.
tar -C "$top" --exclude=__pycache__ --exclude='*.pyc' -c \
  Containerfile pyproject.toml README.md appliance init certs | tar -C "$ctx" -x

args=(--isolation chroot --format docker --pull=never --build-arg "BASE=$base" -t "$image")
[ -n "$index" ] && args+=(--build-arg "PIP_INDEX_URL=$index")
[ -n "$extra" ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
[ -n "$trusted" ] && args+=(--build-arg "PIP_TRUSTED_HOST=$trusted")
[ -n "$cert" ] && [ -f "$cert" ] && args+=(--secret "id=pip-cert,src=$cert")
echo "build: podman build ${args[*]} $ctx" >&2
podman build "${args[@]}" -f "$ctx/Containerfile" "$ctx"
