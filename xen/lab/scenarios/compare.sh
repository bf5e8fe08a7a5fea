#!/bin/sh
# Ferry vs `xl migrate` on the same Linux PVH guest over the same link: host 1 creates
# it and moves it to host 2 with `xl migrate` (socat, as Xen's docs do); host 2 moves it
# back with `ferry` (cooperative suspend, TCP, one channel). Total time and bytes on the
# wire for both; Ferry's downtime from its report (xl does not report one).
ok() { echo "FERRY-RESULT PASS $*"; }
fail() { echo "FERRY-RESULT FAIL $*"; exit 0; }
up() { cut -d' ' -f1 /proc/uptime; }
NET="--transport tcp --insecure --timeout 60s"
if [ "$HOSTID" = 1 ]; then
  for try in 1 2 3; do xl create /guest/domh.cfg >/dev/null 2>&1 && break; sleep 5; done
  for i in $(seq 90); do grep -q "tick 3" /var/log/xen/console/guest-domh.log 2>/dev/null && break; sleep 2; done
  for i in $(seq 60); do socat -u /dev/null TCP:10.0.0.2:5001 2>/dev/null && break; sleep 2; done
  t0=$(up)
  xl migrate -s "" domh "exec sh -c 'dd bs=256k 2>/tmp/dd.log | socat -b 262144 - TCP:10.0.0.2:5000'" > /tmp/xl.log 2>&1; rc=$?
  t1=$(up)
  echo "FERRY-XLMIGRATE rc=$rc seconds=$(echo "$t1 $t0" | awk '{print $1-$2}') $(grep -o '[0-9]* bytes' /tmp/dd.log | tail -1)"
  [ $rc = 0 ] || { tail -3 /tmp/xl.log; fail "xl migrate rc=$rc"; }
  ferry listen --bind 10.0.0.1:7000 --dir /tmp/d $NET --domain-config /guest/domh.cfg --control /tmp/back.sock --json > /tmp/in.json 2>/tmp/in.err &
  for i in $(seq 600); do grep -q '"ok"' /tmp/in.json 2>/dev/null && break; sleep 1; done
  grep -q '"verified": *true' /tmp/in.json || { cat /tmp/in.err; fail "receiving with ferry"; }
  tick() { grep -o "tick [0-9]*" /var/log/xen/console/guest-domh.log | tail -1 | cut -d' ' -f2; }
  a=$(tick); sleep 15; b=$(tick)
  echo "FERRY-STEP back on host 1 (ferry): tick $a then $b"
  [ "${a:-0}" -lt "${b:-0}" ] || fail "the guest does not tick after ferry moved it back"
  ferry stop --vm /tmp/back.sock >/dev/null 2>&1
  ok "host 1"
else
  (socat TCP-LISTEN:5000,reuseaddr EXEC:"xl migrate-receive" > /tmp/recv.log 2>&1 &)
  socat -u TCP-LISTEN:5001,reuseaddr - > /dev/null
  for i in $(seq 600); do xl list domh >/dev/null 2>&1 && break; sleep 1; done
  sleep 12
  echo "FERRY-STEP on host 2 after xl migrate: $(tail -1 /var/log/xen/console/guest-domh--incoming.log 2>/dev/null | tr -d '\r') $(tail -1 /var/log/xen/console/guest-domh.log 2>/dev/null | tr -d '\r')"
  for i in $(seq 150); do
    ferry migrate --backend xen --domain domh --xen-stop suspend --to 10.0.0.1:7000 $NET --channels 1 --json > /tmp/out.json 2>/tmp/out.err && break
    grep -qiE "refused|connecting" /tmp/out.err || break
    sleep 2
  done
  grep -E "total|on the wire|pages sent|pre-copy|error" /tmp/out.err | sed 's/^/FERRY-OUT /'
  grep -q '"verified": *true' /tmp/out.json || fail "ferry migrate back"
  ok "host 2"
fi
