#!/usr/bin/env bash
# Rewrites deploy/docker/requirements.lock: MILI's runtime dependencies (pyproject.toml, no extras) resolved in a
# fresh virtual environment with the Python that runs this script, pinned exactly.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
env="$(mktemp -d)"
trap 'rm -rf "$env"' EXIT
"$python" -m venv "$env"
"$env/bin/pip" install --quiet --upgrade "pip>=24"
echo "lock-requirements.sh: resolving MILI's runtime dependencies (a minute or two)"
"$env/bin/pip" install --quiet "$root"
lock="$root/deploy/docker/requirements.lock"
{
    sed -n '1,/^# Regenerate/p' "$lock"
    "$env/bin/pip" freeze --exclude mili
} > "$lock.new"
mv "$lock.new" "$lock"
echo "lock-requirements.sh: wrote $lock ($(grep -vc '^#' "$lock") packages)"
