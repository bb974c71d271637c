#!/usr/bin/env bash
# Debian packages: libseccomp2 (the jobs' system-call filter, through pyseccomp), e2fsprogs
# (mkfs.ext4, for the per-job disk images; "required" priority on Debian, so normally present) and,
# for the tests, Mesa's lavapipe (software Vulkan) so arch=vulkan runs without a GPU.
set -eu
pkgs="libseccomp2 e2fsprogs mesa-vulkan-drivers libvulkan1"
if dpkg -s $pkgs >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: install $pkgs yourself" >&2; exit 1; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/dev/null
