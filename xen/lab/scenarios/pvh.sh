#!/bin/sh
# On host 1: boot Ferry's PVH test guest, watch it pass its own checks, probe it.
[ "$HOSTID" = 1 ] || exit 0
xl create /guest/pvh.cfg || { echo "FERRY-RESULT FAIL xl create"; exit 0; }
for i in $(seq 60); do xl dmesg | grep -q "ferry-pvh pass 32" && break; sleep 2; done
echo "FERRY-STEP $(xl dmesg | grep ferry-pvh | tail -2 | tr '\n' ' ')"
ferry xen probe --domain ferry-pvh --json > /tmp/probe.json 2>/tmp/probe.err; rc=$?
cat /tmp/probe.err
sleep 4
echo "FERRY-STEP $(xl dmesg | grep ferry-pvh | tail -2 | tr '\n' ' ')"
if xl dmesg | grep -q "ferry-pvh FAIL"; then echo "FERRY-RESULT FAIL the guest's own check"; exit 0; fi
if [ $rc = 0 ] && xl dmesg | grep -q "ferry-pvh pass 32"; then echo "FERRY-RESULT PASS pvh"; else echo "FERRY-RESULT FAIL pvh rc=$rc"; fi
