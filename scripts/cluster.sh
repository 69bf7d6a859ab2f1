#!/usr/bin/env bash
# A local cluster for people who prefer scripts: scripts/cluster.sh {up|down|status} [DIR]
# The same as `duplex local up|down|status --dir DIR` (default ./duplex-local), building the
# release binaries first. Extra arguments after DIR go to `duplex local up` (--nodes, --cpus,
# --paranoid).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: scripts/cluster.sh {up|down|status} [DIR] [up options]" >&2; exit 2; }
[ $# -ge 1 ] || usage
command=$1; shift
dir=${1:-duplex-local}
if [ $# -ge 1 ]; then shift; fi
case "$command" in
  up|down|status) ;;
  *) usage ;;
esac
cargo build --quiet --release -p duplex -p duplexd
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
exec "$target_dir/release/duplex" local "$command" --dir "$dir" "$@"
