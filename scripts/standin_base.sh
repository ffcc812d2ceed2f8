#!/usr/bin/env bash
# Build a stand-in for the Dockerfile's base image (python:3.11-slim-bookworm) where no image registry can
# be reached: Debian bookworm from Debian's mirror (debootstrap --variant=minbase), Debian's Python 3.11 with a
# venv at /usr/local so that `python` and `pip` behave as in the official image, then `docker import`, tagged
# with the official name. Used by `make image-test` only when `docker pull` of the real base fails.
#
#   scripts/standin_base.sh [--tag python:3.11-slim-bookworm] [--ca-bundle FILE]
#
# --ca-bundle FILE: this machine's CA bundle (HTTPS here goes through a proxy with its own CA) is copied to
# /etc/ssl/certs/ca-certificates.crt of the stand-in and pip is pointed at it (/etc/pip.conf). It goes into
# the stand-in base only; an image built on the real base never carries it.
# Needs root, debootstrap and a Docker engine (DOCKER_HOST). About 2 minutes.
set -euo pipefail
TAG="python:3.11-slim-bookworm"
CA_BUNDLE=""
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) TAG="$2"; shift ;;
    --ca-bundle) CA_BUNDLE="$2"; shift ;;
    *) echo "error: unknown argument: $1; see the header of scripts/standin_base.sh" >&2; exit 1 ;;
  esac
  shift
done
command -v debootstrap >/dev/null || { echo "error: debootstrap not found; make image-packages installs it" >&2; exit 1; }
[[ -z "$CA_BUNDLE" || -r "$CA_BUNDLE" ]] || { echo "error: no CA bundle at $CA_BUNDLE" >&2; exit 1; }

ROOT="$(mktemp -d /var/tmp/standin-base.XXXXXX)"
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,libpython3.11-dev,ca-certificates \
  bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -n 20 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
# apt in the image: the same mirror and the security suite, as in the official image
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# python and pip as in the official image: a venv at /usr/local (first on PATH)
chroot "$ROOT" /usr/bin/python3 -m venv /usr/local
if [[ -n "$CA_BUNDLE" ]]; then
  cp "$CA_BUNDLE" "$ROOT/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOT/etc/pip.conf"
fi
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* "$ROOT"/root/.cache
tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "stand-in for $TAG: debootstrap bookworm + Debian python3.11 (scripts/standin_base.sh)" \
  - "$TAG" >/dev/null
echo "stand-in base $TAG built with debootstrap (Debian bookworm, Python $(chroot "$ROOT" /usr/local/bin/python -c 'import sys; print(sys.version.split()[0])'))"
