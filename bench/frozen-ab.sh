#!/bin/bash
# The frozen window of a tiny application (test/fixtures/bin/ticker), two
# builds of appshot side by side, interleaved: each of N rounds takes, for
# each build, a --leave-running and a default snapshot of a fresh ticker,
# first with APPSHOT_ENGINE=off (a cold CLI), then with a warm engine.
# Prints one line per snapshot: build mode kind frozenMs dumpMs trackMs
# injectedCalls heldMs load; bench/frozen-ab-summary.js makes medians.
#
#   bench/frozen-ab.sh OLD_CHECKOUT NEW_CHECKOUT [N=10] > results.txt
# Each checkout built (npm run build, build:native); fixtures from NEW.
set -u
OLD=$1; NEW=$2; N=${3:-10}
declare -A WT=([old]=$OLD [new]=$NEW)
declare -A HOME_OF
for v in old new; do HOME_OF[$v]=$(mktemp -d); done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT" "${HOME_OF[old]}" "${HOME_OF[new]}"' EXIT
for mode in off auto; do
  if [ $mode = auto ]; then
    for v in old new; do APPSHOT_HOME=${HOME_OF[$v]} APPSHOT_ENGINE=auto node ${WT[$v]}/bin/appshot.js engine start >/dev/null 2>&1; done
    sleep 1
  fi
  for i in $(seq 1 "$N"); do
    for kind in lr def; do
      for v in old new; do
        export APPSHOT_HOME=${HOME_OF[$v]} APPSHOT_ENGINE=$mode
        cli=(node "${WT[$v]}/bin/appshot.js")
        aid=t-$mode-$kind-$i
        "${cli[@]}" run -d --aid "$aid" -- "$NEW/test/fixtures/bin/ticker" >/dev/null 2>&1
        sleep 0.3
        extra=(); [ $kind = lr ] && extra=(--leave-running)
        r=$("${cli[@]}" snapshot "$aid" -o "$OUT/$v-$aid" --json "${extra[@]}" 2>/dev/null)
        echo "$v $mode $kind $(echo "$r" | node -e 'try{const j=JSON.parse(require("fs").readFileSync(0,"utf8"));console.log(j.frozenMs, j.phases.dumpMs, j.phases.trackMs, j.injectedCalls, j.phases.heldMs)}catch{console.log("FAIL")}') $(cut -d' ' -f1 /proc/loadavg)"
        "${cli[@]}" kill "$aid" >/dev/null 2>&1 || true
        rm -rf "$OUT/$v-$aid"
      done
    done
  done
  if [ $mode = auto ]; then for v in old new; do APPSHOT_HOME=${HOME_OF[$v]} node ${WT[$v]}/bin/appshot.js engine stop >/dev/null 2>&1; done; fi
done
