#!/usr/bin/env bash
# Install the Debian packages the lab and the test suite need. Idempotent: installs only what is missing.
set -euo pipefail
PKGS=(
  openvswitch-switch ovn-central ovn-host   # OVS (userspace datapath) and OVN
  etcd-server containerd runc               # Kubernetes control plane store and node runtime
  nftables python3-nftables iproute2 ethtool iputils-ping conntrack
  haproxy keepalived busybox-static
  golang-go rsync make build-essential dpkg-dev  # build of Kubernetes 1.20 from Debian source
  user-mode-linux containernetworking-plugins openssl patch
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "netctl: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Services must not be started by the package scripts: the lab starts its own, privately.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
