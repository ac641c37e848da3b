#!/usr/bin/env bash
# Download the wheels of manifest.txt (beside this file) for a machine with no network.
#
#   bash benchmarks/wheels/fetch.sh                      # CPython 3.12, Linux x86_64 -> benchmarks/wheels
#   bash benchmarks/wheels/fetch.sh 3.11 /tmp/wheels311  # another Python, another folder (the CPU rehearsal)
#
# The wheels are ignored by git (.gitignore beside this file): a device call takes them with
# carry: ["benchmarks/wheels"] (about 45 MB for 3.12, most of it numpy and transformers).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=${1:-3.12}
dest=${2:-$here}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        "${platforms[@]}" -d "$dest" "$1" 2>&1 | grep -v "is ignored: it is neither" || true
}
grep -v '^#' "$here/manifest.txt" | awk 'NF { print $1 }' | while read -r requirement; do
    name=${requirement%%==*}
    if ! get "$requirement" | grep -q "No matching distribution"; then
        continue
    fi
    # A pinned version without a wheel for this Python (numpy 2.5 has none for 3.11): the newest one.
    echo "note: $requirement has no wheel for CPython $version; taking the newest $name that has" >&2
    get "$name"
done
du -ch "$dest"/*.whl | tail -1
