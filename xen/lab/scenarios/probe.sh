#!/bin/sh
# On host 1: start the PVH test guest, then `ferry xen probe` on it.
[ "$HOSTID" = 1 ] || exit 0
echo "FERRY-STEP creating the PVH guest"
for try in 1 2 3; do xl create /guest/domh.cfg >/tmp/create.log 2>&1 && break; cat /tmp/create.log; sleep 5; done
for i in $(seq 90); do grep -q "tick 2" /var/log/xen/console/guest-domh.log 2>/dev/null && break; sleep 2; done
echo "FERRY-STEP guest ticking: $(tail -1 /var/log/xen/console/guest-domh.log 2>/dev/null)"
ferry xen probe --domain domh --json > /tmp/probe.json 2>/tmp/probe.err; rc=$?
cat /tmp/probe.err
echo "FERRY-JSON $(tr -d '\n' < /tmp/probe.json)"
if [ $rc = 0 ]; then echo "FERRY-RESULT PASS probe"; else echo "FERRY-RESULT FAIL probe rc=$rc"; fi
