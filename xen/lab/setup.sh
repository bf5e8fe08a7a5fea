#!/bin/bash
# Prepares the nested Xen lab in $LAB (Debian 12 host, root): installs QEMU and the small
# tools the dom0 image uses, and unpacks Xen 4.17 (hypervisor, tools, libraries) and a
# Debian 6.1 kernel into $LAB/x with `apt-get download` + `dpkg -x` (not installed).
set -euo pipefail
LAB=${LAB:?set LAB to the lab work folder}
mkdir -p "$LAB/debs" "$LAB/x"
export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-x86 busybox-static socat kmod cpio; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
kimg=$(apt-cache search '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -1)
[ -n "$kimg" ] || { echo "no Debian 6.1 kernel package found" >&2; exit 1; }
cd "$LAB/debs"
if ! ls xen-hypervisor-4.17-amd64_*.deb >/dev/null 2>&1 || ! ls "$kimg"_*.deb >/dev/null 2>&1; then
  rm -f ./*.deb
  apt-get download xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils \
    libxenmisc4.17 libxenstore4 libxencall1 libxendevicemodel1 libxenevtchn1 \
    libxenforeignmemory1 libxengnttab1 libxentoolcore1 libxentoollog1 libxenhypfs1 libyajl2 \
    libnl-3-200 libnl-route-3-200 "$kimg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
fi
rm -rf "$LAB/x" && mkdir -p "$LAB/x"
for d in ./*.deb; do dpkg -x "$d" "$LAB/x"; done
gunzip -c "$LAB"/x/boot/xen-4.17-amd64.gz > "$LAB/xen"
echo "lab ready in $LAB: $(ls "$LAB"/x/boot/vmlinuz-*), Xen $(ls "$LAB"/x/boot/xen-4.17-amd64.gz)"
