#!/usr/bin/env bash
# Builds the base image leadre-base:bookworm (Debian bookworm, minbase, Python 3.11) from Debian's own archive,
# for machines that reach Debian's mirror but no container registry. Elsewhere any python:3.11-slim-bookworm
# style image will do: pass it as BASE_IMAGE to build.sh instead.
#   images/build_base.sh [TAG]      env: DEBIAN_MIRROR, WORK_DIR, DOCKER
set -euo pipefail

TAG=${1:-leadre-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DOCKER=${DOCKER:-docker}
WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/leadre-base.XXXXXX)}
ROOTFS=$WORK_DIR/rootfs
# python3-venv brings ensurepip, which the image build uses to make /opt/venv; nothing else is needed at run time.
PACKAGES=python3,python3-venv,ca-certificates

if [ "$(id -u)" != 0 ]; then
    echo "build_base.sh: debootstrap needs root" >&2
    exit 1
fi
trap 'rm -rf "$WORK_DIR"' EXIT

start=$(date +%s)
echo "debootstrap bookworm ($PACKAGES) from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS" "$MIRROR" >"$WORK_DIR/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK_DIR/debootstrap.log" >&2; exit 1; }

# Security updates too, so that an apt-get upgrade inside a derived image is not stuck at the point release.
cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
# Downloaded packages, package lists and docs are not needed in an image.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*

tar --numeric-owner -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
"$DOCKER" run --rm "$TAG" python3 --version
echo "$TAG: $("$DOCKER" image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'),"\
     "built in $(( $(date +%s) - start )) s"
