#!/usr/bin/env bash
# Issue 13's check, as a script: the destination's data flush (fdatasync of the received
# image) and its image metadata (sidecar rename) come before the `verified` frame is
# written. Plain TCP, so the frames can be read in strace's output.
#   usage: .ci/durability.sh [path/to/ferry]
set -euo pipefail
ferry=${1:-target/release/ferry}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$ferry" run --memory 64MiB --disk-size 16MiB --disk "$work/src.img" --control "$work/src.sock" 2>"$work/src.log" &
strace -f -e trace=fdatasync,fsync,rename,sendto,write -e signal=none -s 8 -o "$work/strace.txt" \
  "$ferry" listen --bind 127.0.0.1:0 --dir "$work/dst" --control "$work/dst.sock" \
  --transport tcp --insecure 2>"$work/dst.log" &
for _ in $(seq 100); do grep -q "listening on" "$work/dst.log" 2>/dev/null && [ -S "$work/src.sock" ] && break; sleep 0.1; done
addr=$(sed -n 's/^ferry: listening on //p' "$work/dst.log")
"$ferry" migrate --vm "$work/src.sock" --to "$addr" --transport tcp --insecure --json >"$work/report.json" 2>/dev/null
"$ferry" stop --vm "$work/dst.sock" >/dev/null
sleep 0.5
python3 - "$work/strace.txt" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
# A frame header starts with "FY", then the type byte: 9 is `verified`, 22 `round-ack`.
def frame(line, ty):
    return re.search(r'(sendto|write)\(\d+, "FY' + re.escape(ty), line) is not None
verified = next(i for i, l in enumerate(lines) if frame(l, "\\t"))
last_ack = max((i for i, l in enumerate(lines[:verified]) if frame(l, "\\26")), default=0)
pause = lines[last_ack:verified]
syncs = [l for l in pause if "fdatasync(" in l]
renames = [l for l in pause if "rename(" in l and ".ferry" in l]
assert syncs, "no fdatasync between the last round and verified"
assert renames, "no sidecar written between the last round and verified"
print(f"durability: {len(syncs)} fdatasync and the sidecar's rename come before `verified` "
      f"(strace lines {last_ack}..{verified}); {sum('fdatasync(' in l for l in lines[:last_ack])} "
      "background fdatasync during pre-copy")
PY
