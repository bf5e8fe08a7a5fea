#!/bin/sh
# The emulated link between the hosts: does a 128 MiB TCP transfer arrive intact?
if [ "$HOSTID" = 2 ]; then
  socat -u TCP-LISTEN:6000,reuseaddr - > /tmp/rx
  echo "FERRY-STEP host 2 received $(md5sum < /tmp/rx) $(wc -c < /tmp/rx) bytes"
  sleep 5
else
  dd if=/dev/urandom of=/tmp/blob bs=1M count=128 2>/dev/null
  echo "FERRY-STEP host 1 sends $(md5sum < /tmp/blob)"
  for i in $(seq 60); do socat -u FILE:/tmp/blob TCP:10.0.0.2:6000 2>/dev/null && break; sleep 2; done
  sleep 5
fi
echo "FERRY-RESULT PASS net"
