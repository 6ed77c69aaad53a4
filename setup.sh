#!/bin/sh
# Set up a Debian 12 build host for appliance: host packages, qemu-user binfmt, and the Python virtualenv.
# Run as root from the repository: ./setup.sh   (safe to run again)
set -eu
cd "$(dirname "$0")"

PACKAGES="mmdebstrap qemu-user-static binfmt-support arch-test qemu-system-arm u-boot-qemu u-boot-tools
  bmap-tools fdisk dosfstools mtools e2fsprogs device-tree-compiler xz-utils zstd gzip cpio kmod
  python3 python3-venv python3-pip git ca-certificates openssl openssh-client openssh-server util-linux iproute2 curl
  nftables conntrack dnsmasq-base dnsmasq-utils busybox avahi-daemon nodejs chromium chromium-driver"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and registers qemu-user with binfmt_misc)" >&2
  exit 1
fi
echo "== Debian packages"
# A briefly inconsistent archive index must not stop the setup; the install below says what is missing.
apt-get update || apt-get update || echo "setup.sh: apt-get update reported errors; trying the install anyway" >&2
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES

echo "== qemu-user for armhf (binfmt_misc)"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-arm 2>/dev/null || true
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-arm ]; then
  update-binfmts --import qemu-arm
fi
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-arm || {
  echo "setup.sh: qemu-arm binfmt is registered without the F flag; armhf chroots will not work" >&2; exit 1; }

echo "== Python virtualenv (.venv)"
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'    # the tool, and the test suite's packages
echo "setup.sh: done. Build with: .venv/bin/appliance build (or .venv/bin/invoke build)"
