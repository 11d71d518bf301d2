#!/bin/sh
# Install the real programs the integration tests run against (Debian
# packages), only when some are missing.  Needs root (or sudo) and apt.
set -e
missing=""
for program in docker-registry skopeo umoci htpasswd wrk hyperfine nginx redis-server dockerd containerd podman tinyproxy; do
    command -v "$program" >/dev/null 2>&1 || missing="$missing $program"
done
packages=""
# libfuse 2, for the slow disk of tests/slowdisk.py (fusepy loads it).
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2' || { missing="$missing libfuse2"; packages="libfuse2"; }
[ -z "$missing" ] && exit 0
echo "installing test peers (missing:$missing)"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    docker-registry skopeo umoci apache2-utils wrk hyperfine nginx redis-server \
    docker.io containerd podman tinyproxy $packages >/dev/null
