#!/usr/bin/env bash
# Cuts the RustSec advisory snapshot cargo-deny reads in CI (docs/advisories.md) from a clone of
# https://github.com/rustsec/advisory-db: the advisories of every crate named in Cargo.lock and
# fuzz/Cargo.lock, the list of those crates (deny/CRATES), and the clone's commit and date.
#
#   deny/refresh.sh PATH-TO-ADVISORY-DB-CLONE
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: deny/refresh.sh PATH-TO-ADVISORY-DB-CLONE}"
git -C "$src" rev-parse HEAD >/dev/null
db="deny/advisory-db"
crates=$(grep -h '^name = ' Cargo.lock fuzz/Cargo.lock | sed 's/name = "\(.*\)"/\1/' | sort -u)
rm -rf "$db"
mkdir -p "$db/crates"
n=0
for c in $crates; do
  if git -C "$src" cat-file -e "HEAD:crates/$c" 2>/dev/null; then
    mkdir -p "$db/crates/$c"
    for f in $(git -C "$src" ls-tree --name-only HEAD "crates/$c/"); do
      git -C "$src" show "HEAD:$f" >"$db/$f"
      n=$((n + 1))
    done
  fi
done
commit=$(git -C "$src" rev-parse HEAD)
date=$(git -C "$src" log -1 --format=%cI)
echo "$commit $date" >deny/advisory-db/SNAPSHOT
echo "$crates" >deny/CRATES
cat >deny/README.md <<EOT
# deny/

The RustSec advisory database as \`cargo deny\` reads it in CI, cut for the crates of
\`Cargo.lock\` and \`fuzz/Cargo.lock\` (listed in \`CRATES\`): $n advisories of
rustsec/advisory-db commit $commit ($date). Policy and refresh: \`docs/advisories.md\`. The advisories are the RustSec
project's, under CC0-1.0.
EOT
echo "deny/refresh.sh: $n advisories for $(echo "$crates" | wc -l) crates, from $commit ($date)"
