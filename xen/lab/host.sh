#!/bin/bash
# usage: host.sh ID -> runs nested Xen host ID (1 or 2) under QEMU TCG in the foreground;
# its serial console (Xen and dom0) goes to $LAB/hID.serial.log. The two hosts share a
# point-to-point UDP link on 127.0.0.1 (10.0.0.1 <-> 10.0.0.2); nothing leaves the machine.
set -euo pipefail
ID=${1:?usage: host.sh ID}
cd "${LAB:?set LAB to the lab work folder}"
KV=$(basename "$(ls -d x/lib/modules/*)")
MEM=${MEM:-2048}
# smap/smep off: dom0 faults under TCG otherwise. xsave=0: with XSAVE, SSE registers of
# dom0 processes were now and then corrupted under TCG (memcpy and hashes going wrong:
# Ferry's page digests caught it as pages "arriving corrupted"); FXSAVE is reliable.
XENARGS=${XENARGS:-"console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 noreboot smap=0 smep=0 guest_loglvl=all xsave=0"}
if [ "$ID" = 1 ]; then PEER="udp=127.0.0.1:12346,localaddr=127.0.0.1:12345"; else PEER="udp=127.0.0.1:12345,localaddr=127.0.0.1:12346"; fi
rm -f "h$ID.serial.log"
exec qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 1 -m "$MEM" -display none -no-reboot \
  -chardev "file,id=s0,path=h$ID.serial.log" -serial chardev:s0 -monitor none \
  -netdev "socket,id=n0,$PEER" -device "${NIC:-e1000},netdev=n0,mac=52:54:00:00:00:0$ID" \
  -kernel xen -append "$XENARGS" \
  -initrd "x/boot/vmlinuz-$KV console=hvc0 earlyprintk=xen hostid=$ID,dom0-initrd.gz"
