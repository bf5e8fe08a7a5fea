#!/bin/bash
# usage: run.sh SCENARIO [--no-build]
# Builds `ferry` with --features xen, the dom0 image with scenarios/SCENARIO.sh as its
# autorun, boots the nested Xen host(s) under QEMU, waits until every host's autorun is
# done, prints the scenario's FERRY- lines and exits 0 when each host reported PASS (or had
# nothing to do). Needs `setup.sh` first. Logs: $LAB/hN.serial.log.
set -euo pipefail
LAB=${LAB:?set LAB to the lab work folder}
export LAB
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SCENARIO=${1:?usage: run.sh SCENARIO}
HOSTS=${HOSTS:-1}
TIMEOUT=${TIMEOUT:-900}
[ -f "$HERE/scenarios/$SCENARIO.sh" ] || { echo "no scenario $SCENARIO" >&2; exit 2; }
T0=$(date +%s); ts() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
if [ "${2:-}" != --no-build ]; then
  (cd "$ROOT" && cargo build --release -p ferry --features xen)
fi
"$HERE/build.sh" "$ROOT/target/release/ferry" "$HERE/scenarios/$SCENARIO.sh" >/dev/null
ts "dom0 image built"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
rm -f "$LAB"/h*.serial.log
for i in $(seq "$HOSTS"); do
  setsid "$HERE/host.sh" "$i" > "$LAB/h$i.qemu.log" 2>&1 &
  pids+=($!)
done
ok=1
for i in $(seq "$HOSTS"); do
  while ! grep -q "FERRY-LAB-DONE host $i" "$LAB/h$i.serial.log" 2>/dev/null; do
    if [ $(( $(date +%s) - T0 )) -gt "$TIMEOUT" ]; then ts "host $i: timed out"; ok=0; break; fi
    if ! kill -0 "${pids[$((i-1))]}" 2>/dev/null; then ts "host $i: QEMU exited"; ok=0; break; fi
    sleep 2
  done
  ts "host $i done"
done
for i in $(seq "$HOSTS"); do
  grep -a "FERRY-\|ferry" "$LAB/h$i.serial.log" | sed "s/^/[host $i] /" || true
  if grep -aq "FERRY-RESULT FAIL" "$LAB/h$i.serial.log"; then ok=0; fi
done
if [ "$ok" = 1 ] && grep -aq "FERRY-RESULT PASS" "$LAB"/h*.serial.log; then ts "PASSED"; exit 0; fi
ts "FAILED"; exit 1
