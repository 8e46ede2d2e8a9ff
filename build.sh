#!/usr/bin/env bash
# Precompiles the Mojo kernels in mojo_kernels/ into build/mili_kernels.mojoc, the package that
# MAX graphs load as a custom extension. Uses the project's venv mojo unless $MOJO names another.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mojo="${MOJO:-$root/.venv/bin/mojo}"
if [ ! -x "$mojo" ]; then
    mojo="$(command -v mojo || true)"
fi
if [ -z "$mojo" ]; then
    echo "build.sh: no mojo compiler found; run 'make build' (it creates .venv) or set MOJO=/path/to/mojo" >&2
    exit 1
fi
mkdir -p "$root/build"
out="$root/build/mili_kernels.mojoc"
# Compile into a scratch folder first (the file name is the package name) so a failed build
# never leaves a half-written package behind.
tmpdir="$(mktemp -d "$root/build/.tmp.XXXXXX")"
trap 'rm -rf "$tmpdir"' EXIT
tmp="$tmpdir/mili_kernels.mojoc"
echo "build.sh: compiling the Mojo kernels (mojo_kernels/ -> build/mili_kernels.mojoc; up to a minute)"
started=$SECONDS
# mojo's stderr goes through a file so that one known harmless line can be dropped: mojo prints it on
# every run where it cannot locate its crash reporter's handler program (so far: every run from the venv).
# Everything else, compile errors included, is shown as is.
status=0
"$mojo" precompile "$root/mojo_kernels" -o "$tmp" 2>"$tmpdir/stderr" || status=$?
grep -v '^Failed to initialize Crashpad\.  Crash reporting will not be available\.' "$tmpdir/stderr" >&2 || true
if [ "$status" -ne 0 ]; then
    echo "build.sh: the Mojo kernels failed to compile (errors above)" >&2
    exit 1
fi
mv "$tmp" "$out"
echo "build.sh: done in $((SECONDS - started)) s"
