#!/bin/sh
# Ferry vs `xl migrate` on one host, the same Linux PVH guest, both over loopback TCP:
# `xl migrate` (piped through socat, as Xen's docs do) into a new domain, then `ferry`
# (one channel, raw, cooperative suspend) into another. Measured the same way for both:
# total time of the command, bytes through the loopback interface, and the downtime as
# the hypervisor sees it (`ferry xen watch`: the longest interval in which no guest
# domain was running, polled through libxenctrl on the one clock of this host).
[ "$HOSTID" = 1 ] || exit 0
ok() { echo "FERRY-RESULT PASS $*"; }
fail() { echo "FERRY-RESULT FAIL $*"; exit 0; }
NET="--transport tcp --insecure --timeout 60s"
up() { cut -d' ' -f1 /proc/uptime; }
lo() { cat /sys/class/net/lo/statistics/tx_bytes; }
secs() { echo "$1 $2" | awk '{printf "%.1f", $1-$2}'; }
longest() { tr -d '\n ' < "$1" | grep -o '"longest_ms":[0-9.]*' | cut -d: -f2; }
ticks() { cat /var/log/xen/console/guest-"$1"*.log 2>/dev/null | grep -ao "tick [0-9]*" | cut -d' ' -f2 | sort -n | tail -1; }
for try in 1 2 3; do xl create /guest/domh.cfg >/dev/null 2>&1 && break; sleep 5; done
for i in $(seq 90); do grep -q "tick 3" /var/log/xen/console/guest-domh.log 2>/dev/null && break; sleep 2; done
echo "FERRY-STEP guest ticking: $(tail -1 /var/log/xen/console/guest-domh.log)"

# 1. xl migrate to localhost.
(socat TCP-LISTEN:5000,reuseaddr EXEC:"xl migrate-receive" > /tmp/recv.log 2>&1 &)
sleep 1
ferry xen watch --for 400s --json > /tmp/w-xl.json 2>/dev/null &
W=$!
sleep 1
b0=$(lo); t0=$(up)
xl migrate -s "" domh "exec socat - TCP:127.0.0.1:5000" > /tmp/xl.log 2>&1; rc=$?
t1=$(up); b1=$(lo)
wait $W
[ $rc = 0 ] || { tail -5 /tmp/xl.log | sed 's/^/FERRY-XL /'; fail "xl migrate rc=$rc"; }
echo "FERRY-XLMIGRATE total_s=$(secs "$t1" "$t0") loopback_bytes=$((b1-b0)) downtime_ms=$(longest /tmp/w-xl.json)"
a=$(ticks domh); sleep 10; b=$(ticks domh)
echo "FERRY-STEP after xl migrate: tick $a then $b"

# 2. ferry into a second domain on the same host.
ferry listen --bind 127.0.0.1:7000 --dir /tmp/d $NET --domain-config /guest/domh.cfg --domain-name domh-2 --control /tmp/in.sock --json > /tmp/in.json 2>/tmp/in.err &
sleep 2
ferry xen watch --for 400s --json > /tmp/w-ferry.json 2>/dev/null &
W=$!
sleep 1
b0=$(lo); t0=$(up)
# A guest resumed by xl does not advertise feature-suspend again: name the stop mode.
ferry migrate --backend xen --domain domh --xen-stop suspend --to 127.0.0.1:7000 $NET --channels 1 --json > /tmp/out.json 2>/tmp/out.err
t1=$(up); b1=$(lo)
wait $W
grep -E "total|on the wire|pages sent|pre-copy|error" /tmp/out.err | sed 's/^/FERRY-OUT /'
grep -q '"verified": *true' /tmp/out.json || fail "ferry migrate did not verify"
own=$(tr -d '\n ' < /tmp/out.json | grep -o '"downtime_ms":[0-9.]*' | cut -d: -f2)
wire=$(tr -d '\n ' < /tmp/out.json | grep -o '"bytes_on_wire":[0-9]*' | cut -d: -f2)
echo "FERRY-FERRY total_s=$(secs "$t1" "$t0") loopback_bytes=$((b1-b0)) downtime_ms=$(longest /tmp/w-ferry.json) own_downtime_ms=$own bytes_on_wire=$wire"
a=$(ticks domh-2); sleep 10; b=$(ticks domh-2)
echo "FERRY-STEP after ferry: tick $a then $b"
[ -n "$b" ] && [ "${a:-0}" -lt "$b" ] || fail "the guest does not tick after ferry moved it"
ferry stop --vm /tmp/in.sock >/dev/null 2>&1
ok "xl migrate and ferry on one host"
