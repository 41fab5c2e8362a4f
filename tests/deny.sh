#!/usr/bin/env bash
# cargo deny over the workspace (deny.toml; the policy: docs/advisories.md): advisories from the
# snapshot in deny/advisory-db (no network), licenses, bans, sources. Installs cargo-deny (the
# pinned version, from crates.io) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.20.2
if ! grep -q " $version" <<<"$(cargo deny --version 2>/dev/null)"; then
  echo "tests/deny.sh: installing cargo-deny $version (a few minutes)" >&2
  cargo install --locked --quiet cargo-deny --version "$version"
fi

# The snapshot must have been cut for every crate the lock files name: a crate it never saw
# would pass for clean.
missing=$(grep -h '^name = ' Cargo.lock fuzz/Cargo.lock | sed 's/name = "\(.*\)"/\1/' | sort -u \
  | comm -23 - <(sort -u deny/CRATES))
if [ -n "$missing" ]; then
  echo "tests/deny.sh: the advisory snapshot was not cut for: $missing" >&2
  echo "tests/deny.sh: refresh it (deny/refresh.sh, docs/advisories.md)" >&2
  exit 1
fi

# cargo-deny opens its database as a git repository under db-path: one commit of the snapshot,
# dated as the snapshot is.
db=target/deny-dbs/advisory-db-3157b0e258782691
rm -rf "$db"
mkdir -p "$db"
cp -r deny/advisory-db/crates "$db/"
read -r commit date <deny/advisory-db/SNAPSHOT
git -C "$db" init -q
git -C "$db" add -A
GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" git -C "$db" \
  -c user.name=nearby -c user.email=nearby@localhost commit -q -m "rustsec/advisory-db $commit"

cargo deny --offline check --show-stats
