#!/bin/sh
# One host: the Linux PVH guest (PV console, xenbus) migrated with `ferry` into a second
# domain, stopped by a cooperative suspend; its ticks must go on in the new domain.
[ "$HOSTID" = 1 ] || exit 0
fail() { echo "FERRY-RESULT FAIL $*"; exit 0; }
NET="--transport tcp --insecure --timeout 60s"
for try in 1 2 3; do xl create /guest/domh.cfg >/dev/null 2>&1 && break; sleep 5; done
for i in $(seq 90); do grep -q "tick 3" /var/log/xen/console/guest-domh.log 2>/dev/null && break; sleep 2; done
echo "FERRY-STEP guest ticking: $(tail -1 /var/log/xen/console/guest-domh.log)"
echo "FERRY-STEP feature-suspend=$(xenstore-read /local/domain/$(xl domid domh)/control/feature-suspend 2>&1)"
ferry listen --bind 127.0.0.1:7000 --dir /tmp/d $NET --domain-config /guest/domh.cfg --domain-name domh-2 --control /tmp/in.sock --json > /tmp/in.json 2>/tmp/in.err &
sleep 2
ferry migrate --backend xen --domain domh --xen-stop suspend --to 127.0.0.1:7000 $NET --json > /tmp/out.json 2>/tmp/out.err
grep -v "^  round" /tmp/out.err | sed 's/^/FERRY-OUT /'
for i in $(seq 60); do grep -q '"ok"' /tmp/in.json 2>/dev/null && break; sleep 1; done
sed 's/^/FERRY-IN /' /tmp/in.err
grep -q '"verified": *true' /tmp/out.json || fail "migration did not verify"
xl list | sed 's/^/FERRY-XL /'
sleep 15
echo "FERRY-STEP new domain's console: $(tail -2 /var/log/xen/console/guest-domh-2.log 2>/dev/null | tr '\n' ' ')"
grep -q "tick" /var/log/xen/console/guest-domh-2.log 2>/dev/null || fail "no ticks from the guest in its new domain"
echo "FERRY-RESULT PASS linux"
