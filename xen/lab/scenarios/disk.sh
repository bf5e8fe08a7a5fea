#!/bin/sh
# Whole-system migration of a Linux PVH guest with a local disk that ferry serves
# (/dev/nbdN under blkback): host 1 -> host 2 (the whole disk: storage pre-copy, memory
# rounds, suspend, last blocks and pages) and back host 2 -> host 1 (incremental: only
# the blocks written on host 2, against the image host 1 kept). The guest writes and
# checks sequence-numbered blocks on its disk throughout; each host checks that its
# writes go on and that no check failed.
. /lab.sh
CON=/var/log/xen/console/guest-domd.log
last_seq() { grep -ao "domU disk seq [0-9]*" "$CON" 2>/dev/null | tail -1 | cut -d' ' -f4; }
# migrate_to SOCK ADDR: the guest at SOCK to ADDR; its old domain must be gone.
migrate_to() {
  migrate_retry --vm "$1" --to "$2" $NET --channels 1
  xl list domd >/dev/null 2>&1 && fail "the migrated-away domain still exists"
}
field() { tr -d '\n ' < /tmp/out.json | grep -o "\"$1\":[^,}]*" | head -1 | cut -d: -f2; }
# receive ADDR DIR SOCK: listens, waits until the guest was received and resumed.
receive() {
  rm -f /tmp/in.json
  ferry listen --bind "$1" --dir "$2" $NET --domain-config /guest/domd.cfg --control "$3" --json > /tmp/in.json 2>/tmp/in.err &
  for i in $(seq 900); do grep -q '"ok"' /tmp/in.json 2>/dev/null && break; kill -0 $! 2>/dev/null || break; sleep 1; done
  grep -q '"verified": *true' /tmp/in.json || { sed 's/^/FERRY-IN /' /tmp/in.err; fail "receiving on $1"; }
  echo "FERRY-STEP received and resumed on host $HOSTID: $(ferry status --vm "$3" --json | tr -d '\n ' | grep -o '"disks":\[[^]]*\]')"
}
# watch: the guest's disk writes go on here and none of its checks failed.
watch() {
  for i in $(seq 30); do a=$(last_seq); [ -n "$a" ] && break; sleep 1; done
  sleep 25; b=$(last_seq)
  echo "FERRY-STEP host $HOSTID: guest disk writes at seq ${a:-none} then ${b:-none}"
  grep -a "domU disk FAIL" "$CON" | head -3 | sed 's/^/FERRY-GUEST /'
  grep -aq "domU disk FAIL" "$CON" && fail "the guest found a block it wrote lost or stale"
  [ -n "$b" ] && [ "${a:-0}" -lt "$b" ] || fail "the guest's disk writes are not advancing on host $HOSTID"
}
if [ "$HOSTID" = 1 ]; then
  mkdir -p /var/lib/ferry
  ferry run --backend xen --domain-config /guest/domd.cfg --disk /var/lib/ferry/domd.img \
    --disk-size 64MiB --disk-used 0.25 --control /tmp/vm.sock > /tmp/run.out 2>/tmp/run.err &
  RUN=$!
  for i in $(seq 120); do [ "$(last_seq)" -ge 320 ] 2>/dev/null && break; sleep 2; done
  [ -n "$(last_seq)" ] || { sed 's/^/FERRY-RUN /' /tmp/run.err; tail -5 "$CON" | sed 's/^/FERRY-GUEST /'; tail -20 /var/log/xen/xen-hotplug.log 2>&1 | sed 's/^/FERRY-HOTPLUG /'; fail "the guest never wrote its disk"; }
  echo "FERRY-STEP host 1: guest running from a ferry-served disk ($(xenstore-read /local/domain/0/backend/vbd/$(xl domid domd)/51712/params)), disk seq $(last_seq), ticks: $(grep -ac tick "$CON")"
  migrate_to /tmp/vm.sock 10.0.0.2:7000
  echo "FERRY-STEP host 1 -> host 2: blocks sent $(field blocks_sent), plans $(field disk_plans)"
  for i in $(seq 30); do kill -0 $RUN 2>/dev/null || break; sleep 1; done
  kill -0 $RUN 2>/dev/null && fail "the source process did not exit after the hand-over"
  ferry image info /var/lib/ferry/domd.img 2>&1 | sed 's/^/FERRY-STEP base: /'
  mv "$CON" /tmp/console-before.log
  receive 10.0.0.1:7000 /var/lib/ferry /tmp/back.sock
  watch
  ferry stop --vm /tmp/back.sock >/dev/null 2>&1
  ok "host 1: out with the whole disk and back incrementally"
else
  receive 10.0.0.2:7000 /tmp/d /tmp/in.sock
  watch
  migrate_to /tmp/in.sock 10.0.0.1:7000
  sent=$(field blocks_sent); base=$(field blocks_skipped_base)
  echo "FERRY-STEP host 2 -> host 1: blocks sent $sent, skipped as already in host 1's image $base, plans $(field disk_plans)"
  # Back home only what changed: far fewer blocks than the 16,384 of the disk.
  [ -n "$sent" ] && [ "$sent" -lt 4096 ] || fail "the way back was not incremental ($sent blocks sent)"
  ok "host 2: in, running from its disk, back incrementally"
fi
