#!/usr/bin/env bash
# npm run demo: a counting program is started under appshot, snapshotted
# (which ends it), inspected, and restored: it goes on counting from where
# it was, with the same virtual PID.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p demo/bin
cc -O1 -o demo/bin/counter demo/counter.c
export APPSHOT_HOME="$(mktemp -d)"
image="$APPSHOT_HOME/counter.appshot"
appshot() { node bin/appshot.js "$@"; }
trap 'appshot stop demo -s KILL 2>/dev/null || true; rm -rf "$APPSHOT_HOME"' EXIT

echo "== appshot run -d --aid demo -- demo/bin/counter"
appshot run -d --aid demo -- demo/bin/counter
sleep 1.2
appshot logs demo | tail -n 2
echo "== appshot snapshot demo -o $image"
appshot snapshot demo -o "$image"
echo "== appshot inspect (first lines)"
appshot inspect "$image" | head -n 8
echo "== appshot restore $image"
appshot restore "$image"
sleep 1.2
appshot ps demo
appshot logs demo | tail -n 3
