#!/bin/sh
# One host: Ferry's PVH guest migrated with `ferry` into a second domain on the same host
# (loopback), then checked to continue.
[ "$HOSTID" = 1 ] || exit 0
fail() { echo "FERRY-RESULT FAIL $*"; exit 0; }
NET="--transport tcp --insecure --timeout 60s"
last_pass() { xl dmesg | grep -o "ferry-pvh pass [0-9]*" | tail -1 | cut -d' ' -f3; }
xl create /guest/pvh.cfg >/dev/null || fail "xl create"
for i in $(seq 60); do [ "$(last_pass)" -ge 2 ] 2>/dev/null && break; sleep 2; done
echo "FERRY-STEP guest running, pass $(last_pass)"
ferry listen --bind 127.0.0.1:7000 --dir /tmp/d $NET --domain-config /guest/pvh.cfg --domain-name ferry-pvh-2 --control /tmp/in.sock --json > /tmp/in.json 2>/tmp/in.err &
sleep 2
ferry migrate --backend xen --domain ferry-pvh --to 127.0.0.1:7000 $NET --json > /tmp/out.json 2>/tmp/out.err
grep -v "^  round" /tmp/out.err | sed 's/^/FERRY-OUT /'
for i in $(seq 60); do grep -q '"ok"' /tmp/in.json 2>/dev/null && break; sleep 1; done
sed 's/^/FERRY-IN /' /tmp/in.err
grep -q '"verified": *true' /tmp/out.json || fail "migration did not verify"
xl list | sed 's/^/FERRY-XL /'
a=$(last_pass); sleep 10; b=$(last_pass)
echo "FERRY-STEP after: pass $a then $b"
xl dmesg | grep -q "ferry-pvh FAIL" && fail "$(xl dmesg | grep 'ferry-pvh FAIL' | head -1)"
[ "${a:-0}" -lt "${b:-0}" ] || fail "not advancing"
echo "FERRY-RESULT PASS local"
