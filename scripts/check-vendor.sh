#!/usr/bin/env bash
# Checks that vendor/candle-core is the published candle-core 0.11.1 plus exactly the two patches
# of vendor/README.md, then runs its gradient tests on that tree.
#   1. downloads the crate from crates.io and checks its SHA-256 (the registry's checksum);
#   2. removes what the vendored copy leaves out (benches/, examples/, their Cargo.toml sections,
#      the packaging files) and applies vendor/candle-core-{backprop,pickle}.patch;
#   3. compares the result with vendor/candle-core file by file (any difference fails);
#   4. runs `grad_tests` there, with the crate's own published Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.11.1
SHA256=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325
# The crate is cached in target/; it is unpacked outside the repository (or cargo would take the
# copy for a member of this workspace), in a directory of this run's own.
CRATE="$PWD/target/vendor-check/candle-core-$VERSION.crate"
mkdir -p "$(dirname "$CRATE")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ ! -f "$CRATE" ] || ! echo "$SHA256  $CRATE" | sha256sum -c --quiet - 2>/dev/null; then
  curl -sSfL --retry 3 -o "$CRATE" "https://static.crates.io/crates/candle-core/candle-core-$VERSION.crate"
fi
echo "$SHA256  $CRATE" | sha256sum -c --quiet -
tar xzf "$CRATE" -C "$WORK"
SRC="$WORK/candle-core-$VERSION"
rm -rf "$SRC/benches" "$SRC/examples" "$SRC/.cargo_vcs_info.json" "$SRC/Cargo.toml.orig"
# Drop the [[example]] and [[bench]] tables, as the vendored Cargo.toml does (blank lines kept).
python3 - "$SRC/Cargo.toml" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r'\[\[(?:example|bench)\]\]\n(?:[^\[\n][^\n]*\n)*', '', s)
open(p, "w").write(s)
PY
patch -s -d "$SRC" -p1 < vendor/candle-core-backprop.patch
patch -s -d "$SRC" -p1 < vendor/candle-core-pickle.patch
# The published lock file is used for the tests below but is not part of the vendored tree.
if ! diff -r -x Cargo.lock -x target "$SRC" vendor/candle-core; then
  echo "vendor/candle-core differs from candle-core $VERSION + vendor/*.patch (diff above)" >&2
  exit 1
fi
echo "vendor/candle-core = candle-core $VERSION + backprop and pickle patches"
cargo test -q --locked --manifest-path "$SRC/Cargo.toml" --target-dir "$PWD/target/vendor-check" --test grad_tests
