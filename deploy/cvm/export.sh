#!/usr/bin/env bash
# deploy/cvm/export.sh IMAGE OUT.tar — the Veil tree of IMAGE (/opt/veil, /opt/veil-kernels) as a
# tarball for cloud-init.yaml, and its SHA-256. IMAGE by digest, e.g. localhost/veil@sha256:...
set -euo pipefail
image="${1:?usage: export.sh IMAGE OUT.tar}" out="${2:?usage: export.sh IMAGE OUT.tar}"
case "$image" in *@sha256:*) ;; *) echo "export.sh: give the image by digest" >&2; exit 2 ;; esac
ctr=$(podman create --pull=never "$image")
trap 'podman rm --force "$ctr" >/dev/null' EXIT
mnt=$(podman mount "$ctr")
# Sorted, numeric owners, fixed times: the same image gives the same tarball.
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$mnt" -cf "$out" opt/veil opt/veil-kernels
podman umount "$ctr" >/dev/null
sha256sum "$out"
