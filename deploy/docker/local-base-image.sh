#!/usr/bin/env bash
# A base image for the MILI Dockerfile on a machine whose Docker cannot pull from a registry (an air-gapped build
# host, or this project's CI): Debian bookworm with Debian's Python 3.11, made with debootstrap from a Debian
# mirror and loaded with `docker import`. Where a registry is reachable, use the default python:3.11-slim-bookworm.
#
#   deploy/docker/local-base-image.sh [TAG]        (default TAG: mili-local/python:3.11-bookworm; needs root)
#   docker build -f deploy/docker/Dockerfile --build-arg BASE_IMAGE=mili-local/python:3.11-bookworm -t mili .
set -euo pipefail
tag="${1:-mili-local/python:3.11-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
command -v debootstrap >/dev/null || { echo "local-base-image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "local-base-image.sh: debootstrap bookworm (minbase + python3, venv, ca-certificates) from $mirror; a few minutes"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# The host's trust store, so that pip in a build on this host trusts what the host trusts (on a network whose
# proxy re-signs TLS, its CA is in there); pip reads PIP_CERT rather than the system store.
cp /etc/ssl/certs/ca-certificates.crt "$root"/etc/ssl/certs/ca-certificates.crt
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["python3"]' - "$tag"
echo "local-base-image.sh: made $tag"
