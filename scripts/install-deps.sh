#!/usr/bin/env bash
# Install the Debian packages euca-ha needs on the controller (a fresh Debian 12 machine, as root).
# Idempotent and quiet when everything is already there: apt is only called for missing packages.
set -euo pipefail

packages=(
  systemd-container   # systemd-nspawn: the testbed's hosts
  openssh-server      # sshd inside every testbed host (the hosts share the controller's /)
  openssh-client
  iproute2            # bridges, veths, tc netem
  nftables            # partitions and route cuts between testbed hosts
  iptables            # NFQUEUE rules for the delayer (kernels without sch_netem)
  iputils-ping
  python3             # Debian's interpreter: ansible_python_interpreter on the hosts
  python3-venv
  rsync
  procps
  util-linux          # nsenter, mount
  postgresql          # the optional production backend (euca_postgresql role, tests)
  nginx-light         # static-file ceiling of the S3 benchmark (run as a throwaway child process)
)

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: run as root (apt-get install is needed for: ${packages[*]})" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
