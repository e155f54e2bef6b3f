#!/usr/bin/env bash
# Boots Debian's cloud kernel (package linux-image-cloud-amd64) with a busybox
# initramfs under stasis, through the PVH entry of the uncompressed vmlinux.
# On hosts whose KVM emulates guest ring 0 (PVM) this takes a very long time;
# it is a background check, not a test. Usage:
#   scripts/debian-kernel-boot.sh [OUTDIR] [extra stasis run flags...]
set -euo pipefail
out=${1:-/tmp/stasis-debian-boot}
shift || true
mkdir -p "$out"
if ! ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1; then
  apt-get install -y linux-image-cloud-amd64 busybox-static lz4 cpio
fi
vmlinuz=$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)

# The bzImage carries an LZ4 (legacy frame) payload; find its magic and
# decompress from there to get the ELF vmlinux with its PVH note.
if [ ! -s "$out/vmlinux" ]; then
  off=$(grep -abo $'\x02\x21\x4c\x18' "$vmlinuz" | head -1 | cut -d: -f1)
  tail -c +"$((off + 1))" "$vmlinuz" | lz4 -dc > "$out/vmlinux" 2>/dev/null || true
  readelf -n "$out/vmlinux" | grep -q "Xen" || { echo "no PVH note in extracted vmlinux" >&2; exit 1; }
fi

# A busybox initramfs whose init reports and powers off.
rm -rf "$out/initramfs" && mkdir -p "$out/initramfs"/{bin,proc,sys,dev}
cp /bin/busybox "$out/initramfs/bin/busybox"
for a in sh mount cat echo poweroff sleep; do ln -sf busybox "$out/initramfs/bin/$a"; done
cat > "$out/initramfs/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "STASIS-LINUX-INIT: userspace reached"
echo "STASIS-LINUX-INIT: cpus=$(grep -c ^processor /proc/cpuinfo) uptime=$(cat /proc/uptime)"
poweroff -f
INIT
chmod +x "$out/initramfs/init"
(cd "$out/initramfs" && find . | cpio -o -H newc 2>/dev/null) > "$out/initramfs.cpio"

stasis=${STASIS:-$(dirname "$0")/../target/release/stasis}
start=$(date +%s)
"$stasis" run --name debian-boot --kernel "$out/vmlinux" --initrd "$out/initramfs.cpio" \
  --memory 512M --vcpus 2 --serial "file:$out/serial.log" \
  --cmdline "console=ttyS0 earlyprintk=serial,ttyS0 loglevel=8 panic=-1" "$@" \
  2> "$out/stasis.log" || true
echo "elapsed $(( $(date +%s) - start )) s" >> "$out/stasis.log"
