#!/usr/bin/env bash
# Builds the `FROM scratch` image of deploy/docker/Dockerfile: the binaries statically linked in
# release mode (their own target directory, so the dev build is not rebuilt), copied into a
# context directory, then `docker build` with the legacy builder (no BuildKit, nothing pulled).
#
#   deploy/docker/build.sh [TAG]      # default tag: nearby-node:<workspace version>
#
# Needs a running Docker engine (DOCKER_HOST is honoured) and the x86_64-unknown-linux-gnu target
# (the machine's own).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="${1:-nearby-node:$version}"
target_dir="${NEARBY_STATIC_TARGET_DIR:-target/static}"
echo "deploy/docker/build.sh: building static binaries into $target_dir (a release build: minutes)" >&2
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
  --target x86_64-unknown-linux-gnu --target-dir "$target_dir" -p nearby-node -p nearby-client --bins
bin="$target_dir/x86_64-unknown-linux-gnu/release"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
for b in nearby-node nodectl nearby; do
  if ldd "$bin/$b" >/dev/null 2>&1 && ! grep -q "statically linked" <<<"$(ldd "$bin/$b" 2>&1)"; then
    echo "deploy/docker/build.sh: $b is not statically linked" >&2
    exit 1
  fi
  cp "$bin/$b" "$ctx/"
  # The release profile keeps debug info for profiling; the image does not need it.
  strip "$ctx/$b"
done
cp deploy/docker/Dockerfile "$ctx/"
echo "deploy/docker/build.sh: docker build -t $tag" >&2
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx"
echo "$tag"
