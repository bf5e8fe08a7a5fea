#!/bin/sh
# The same guest and link with Xen's own `xl migrate` (host 1 -> host 2), for comparison:
# total time and bytes on the wire; host 2 then watches the guest's own checks.
ok() { echo "FERRY-RESULT PASS $*"; }
fail() { echo "FERRY-RESULT FAIL $*"; exit 0; }
last_pass() { xl dmesg | grep -o "ferry-pvh pass [0-9]*" | tail -1 | cut -d' ' -f3; }
up() { cut -d' ' -f1 /proc/uptime; }
if [ "$HOSTID" = 1 ]; then
  xl create /guest/pvh.cfg >/dev/null || fail "xl create"
  for i in $(seq 60); do [ "$(last_pass)" -ge 2 ] 2>/dev/null && break; sleep 2; done
  echo "FERRY-STEP host 1: guest running, pass $(last_pass)"
  for i in $(seq 60); do socat -u /dev/null TCP:10.0.0.2:5001 2>/dev/null && break; sleep 2; done
  t0=$(up)
  xl migrate -s "" ferry-pvh "exec sh -c 'dd bs=256k 2>/tmp/dd.log | socat -b 262144 - TCP:10.0.0.2:5000'" > /tmp/xl.log 2>&1; rc=$?
  t1=$(up)
  tail -3 /tmp/xl.log | sed 's/^/FERRY-XL /'
  echo "FERRY-XLMIGRATE rc=$rc seconds=$(echo "$t1 $t0" | awk '{print $1-$2}') bytes=$(grep -o '^[0-9]* bytes' /tmp/dd.log | tail -1)"
  [ $rc = 0 ] && ok "xl migrate out" || fail "xl migrate rc=$rc"
else
  xl dmesg -c >/dev/null
  (socat TCP-LISTEN:5000,reuseaddr EXEC:"xl migrate-receive" > /tmp/recv.log 2>&1 &)
  socat -u TCP-LISTEN:5001,reuseaddr - > /dev/null
  # The incoming domain is called ferry-pvh--incoming until the migration completes.
  for i in $(seq 600); do xl list ferry-pvh >/dev/null 2>&1 && break; sleep 1; done
  sleep 3
  a=$(last_pass); sleep 12; b=$(last_pass)
  echo "FERRY-STEP host 2: guest at pass ${a:-none} then ${b:-none}"
  xl dmesg | grep -q "ferry-pvh FAIL" && fail "after xl migrate the guest's own check failed: $(xl dmesg | grep 'ferry-pvh FAIL' | head -1)"
  [ -n "$b" ] && [ "${a:-0}" -lt "$b" ] || fail "the guest is not advancing on host 2"
  ok "host 2: guest continued after xl migrate"
fi
