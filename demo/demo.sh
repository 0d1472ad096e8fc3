#!/usr/bin/env bash
# npm run demo: a counting program is started under appshot, snapshotted
# (which ends it), inspected, and restored: it goes on counting from where
# it was, with the same virtual PID. Then the snapshot becomes a template,
# and three clones go on counting from there, each on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p demo/bin
cc -O1 -o demo/bin/counter demo/counter.c
export APPSHOT_HOME="$(mktemp -d)"
image="$APPSHOT_HOME/counter.appshot"
appshot() { node bin/appshot.js "$@"; }
cleanup() {
  appshot rm -f demo copy-1 copy-2 copy-3 >/dev/null 2>&1 || true
  rm -rf "$APPSHOT_HOME"
}
trap cleanup EXIT

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
appshot logs --tail 3 demo        # the same log, before and after the snapshot
echo "== appshot template create $image -o counter.template"
appshot template create "$image" -o "$APPSHOT_HOME/counter.template"
echo "== appshot clone counter.template --aid copy --count 3"
appshot clone "$APPSHOT_HOME/counter.template" --aid copy --count 3
sleep 1.2
appshot ps
for aid in copy-1 copy-2 copy-3; do echo "-- $aid"; appshot logs "$aid" | tail -n 2; done
