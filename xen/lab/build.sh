#!/bin/bash
# usage: build.sh FERRY AUTORUN -> $LAB/dom0-initrd.gz: a busybox dom0 with the Xen 4.17
# tools and libraries, the `ferry` binary FERRY (built with --features xen) and its
# libraries, the PVH test guests — Debian's kernel with a busybox initrd that keeps
# writing memory (/guest/domh.cfg; /guest/domd.cfg is the same guest for a disk that
# `ferry` serves, which it writes and checks block by block) and Ferry's self-checking
# PVH kernel (/guest/pvh.cfg, from xen/guest/pvh.S) — and AUTORUN as /autorun.sh.
set -euo pipefail
LAB=${LAB:?set LAB to the lab work folder}
FERRY=$(realpath "${1:?usage: build.sh FERRY AUTORUN}")
AUTORUN=$(realpath "${2:?usage: build.sh FERRY AUTORUN}")
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$LAB"
KV=$(basename "$(ls -d x/lib/modules/*)")
M=x/lib/modules/$KV/kernel
rm -rf root0 rootU; mkdir -p root0 rootU
# The test guest: busybox in an initramfs, rewriting 16 MiB every 2 s. Given a disk
# (xvda), it also writes sequence-numbered blocks round a ring of 256 blocks with
# O_DIRECT, and before overwriting a block reads it back from the disk and checks it
# holds the number written one lap before: a block lost or stale in a migration shows
# as "domU disk FAIL".
mkdir -p rootU/{bin,proc,sys,dev,tmp,mods}
cp /bin/busybox rootU/bin/busybox
cp $M/drivers/block/xen-blkfront.ko rootU/mods/
cat > rootU/init <<'EOI'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=64m tmpfs /tmp
insmod /mods/xen-blkfront.ko 2>/dev/null
disk() {
  n=256; i=0
  while true; do
    i=$((i+1)); b=$((i % n))
    if [ $i -gt $n ]; then
      want="ferry-disk seq $((i-n)) block $b"
      got=$(dd if=/dev/xvda bs=4096 skip=$b count=1 iflag=direct 2>/dev/null | head -c ${#want})
      [ "$got" = "$want" ] || echo "domU disk FAIL block $b: want '$want' got '$got'" > /dev/hvc0
    fi
    echo "ferry-disk seq $i block $b" | dd of=/dev/xvda bs=4096 seek=$b conv=sync,notrunc oflag=direct 2>/dev/null \
      || echo "domU disk FAIL writing block $b" > /dev/hvc0
    [ $((i % 64)) = 0 ] && echo "domU disk seq $i" > /dev/hvc0
  done
}
for t in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/xvda ] && break; sleep 1; done
[ -b /dev/xvda ] && disk &
i=0
while true; do
  i=$((i+1))
  dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null
  echo "domU tick $i uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/hvc0
  sleep 2
done
EOI
chmod +x rootU/init
(cd rootU && find . | cpio -o -H newc 2>/dev/null | gzip -1) > domU-initrd.gz
# dom0.
mkdir -p root0/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,var/lib/xen,var/log/xen,var/lib/xenstored,lib64,lib/x86_64-linux-gnu,usr/lib/x86_64-linux-gnu,etc,mods,guest,root}
ln -s ../run root0/var/run
cp /bin/busybox root0/bin/busybox
cp -a x/usr/lib/xen-4.17 root0/usr/lib/
rm -rf root0/usr/lib/xen-4.17/lib/python root0/usr/lib/xen-4.17/boot
cp -a x/usr/lib/x86_64-linux-gnu/. root0/usr/lib/x86_64-linux-gnu/
cp -a x/lib/x86_64-linux-gnu/. root0/lib/x86_64-linux-gnu/ 2>/dev/null || true
cp -a x/etc/xen root0/etc/
for l in libc.so.6 libm.so.6 liblzma.so.5 libuuid.so.1 libz.so.1 libzstd.so.1 libtinfo.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2; do
  cp -L /lib/x86_64-linux-gnu/$l root0/lib/x86_64-linux-gnu/; done
cp -L /lib64/ld-linux-x86-64.so.2 root0/lib64/
cp /usr/bin/socat root0/usr/bin/socat
for l in $(ldd /usr/bin/socat | awk '/=>/{print $3}'); do cp -nL "$l" root0/lib/x86_64-linux-gnu/; done
# ferry, stripped, with the host libraries it links that the Xen packages do not bring.
strip -o root0/usr/bin/ferry "$FERRY"
for l in $(ldd "$FERRY" | awk '/=>/{print $3}'); do
  b=$(basename "$l")
  [ -e "root0/usr/lib/x86_64-linux-gnu/$b" ] || [ -e "root0/lib/x86_64-linux-gnu/$b" ] || cp -L "$l" root0/lib/x86_64-linux-gnu/
done
for b in xl xenstored xenconsoled xen-init-dom0 xenconsole xen-hvmctx xen-mfndump; do ln -sf /usr/lib/xen-4.17/bin/$b root0/usr/sbin/$b; done
cp -a x/usr/bin/xenstore* root0/usr/bin/
# bash, flock and GNU stat for Xen's hotplug scripts (/etc/xen/scripts/block sets up the
# guest's phy: disks; busybox has no flock).
cp /bin/bash root0/bin/bash; cp /usr/bin/flock /usr/bin/stat root0/usr/bin/
for l in $(ldd /bin/bash /usr/bin/flock /usr/bin/stat | awk '/=>/{print $3}'); do cp -nL "$l" root0/lib/x86_64-linux-gnu/; done
for m in drivers/block/nbd drivers/block/xen-blkback/xen-blkback drivers/xen/xen-privcmd drivers/xen/xenfs/xenfs drivers/xen/xen-evtchn drivers/xen/xen-gntdev drivers/xen/xen-gntalloc drivers/net/ethernet/intel/e1000/e1000 drivers/net/ethernet/intel/e1000e/e1000e; do
  cp $M/$m.ko root0/mods/; done
cp x/boot/vmlinuz-$KV root0/guest/vmlinuz
cp domU-initrd.gz root0/guest/initrd.gz
cat > root0/guest/domh.cfg <<'EOC'
name = "domh"
type = "pvh"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0 quiet"
memory = 256
vcpus = 1
on_crash = "preserve"
# QEMU-TCG's SVM reports RDTSCP exits as RDTSC: hide rdtscp from PVH guests.
cpuid = "host,rdtscp=0"
EOC
# The same guest with a disk that `ferry run --domain-config` serves (it adds disk=[...]).
sed 's/^name = "domh"/name = "domd"/' root0/guest/domh.cfg > root0/guest/domd.cfg
# Ferry's own PVH test guest (xen/guest/pvh.S): checks every page after every pass.
as --64 -o pvh.o "$HERE/../guest/pvh.S"
ld -m elf_x86_64 -T "$HERE/../guest/pvh.ld" -o root0/guest/ferry-pvh pvh.o
cat > root0/guest/pvh.cfg <<'EOC'
name = "ferry-pvh"
type = "pvh"
kernel = "/guest/ferry-pvh"
memory = 256
vcpus = 1
on_crash = "preserve"
cpuid = "host,rdtscp=0"
EOC
echo 'root:x:0:0:root:/root:/bin/sh' > root0/etc/passwd
echo 'root:x:0:' > root0/etc/group
printf '10.0.0.1 xenhost1\n10.0.0.2 xenhost2\n127.0.0.1 localhost\n' > root0/etc/hosts
# A key pair per host for tls/quic, each host pinning the other's fingerprint.
mkdir -p root0/keys
for h in h1 h2; do "$FERRY" keygen --out root0/keys --name $h 2>/dev/null; done
cp "$HERE/dom0-init" root0/init; chmod +x root0/init
cp "$AUTORUN" root0/autorun.sh; chmod +x root0/autorun.sh
cp "$HERE/lab.sh" root0/lab.sh
(cd root0 && find . | cpio -o -H newc 2>/dev/null | gzip -1) > dom0-initrd.gz
echo "built $LAB/dom0-initrd.gz ($(du -h dom0-initrd.gz | cut -f1)), kernel $KV"
