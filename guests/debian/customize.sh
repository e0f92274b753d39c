#!/bin/sh
# mmdebstrap's customize hook for the Debian example (run by
# `cargo xtask debian build` on the host, as root, with the new root file
# system's directory as $1 and the recipe's user, password and hostname in
# MOAT_USER, MOAT_PASSWORD, MOAT_HOSTNAME).
set -eu
root=$1
echo "$MOAT_HOSTNAME" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    "$MOAT_HOSTNAME" >"$root/etc/hosts"
# The root disk is the guest's virtio disk; the initrd mounts it read-write.
printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t0\n' >"$root/etc/fstab"
chroot "$root" useradd --create-home --shell /bin/bash "$MOAT_USER"
printf '%s:%s\nroot:%s\n' "$MOAT_USER" "$MOAT_PASSWORD" "$MOAT_PASSWORD" |
    chroot "$root" chpasswd
# An empty machine-id: systemd makes one at the first boot.
: >"$root/etc/machine-id"
