#!/usr/bin/env bash
# Leaves out of the image's libraries (a site-packages directory holding torch/lib and nvidia/)
# what image/cuda-extras.txt lists, except the groups named in CUDA_EXTRAS; also the static
# archives, bitcode, headers and Python files, which nothing at run time loads.
#
# Usage: prune-libs.sh SITE_PACKAGES LIST "GROUPS KEPT"
set -euo pipefail
site=$1 list=$2 keep=" ${3:-} "

removed=0
drop() {
    local file=$1
    removed=$((removed + $(stat -c %s "$file")))
    rm -f "$file"
}
while read -r group prefixes; do
    case "$group" in '' | '#'*) continue ;; esac
    if [ "$group" != never ] && [[ "$keep" == *" $group "* ]]; then
        echo "prune-libs: keeping $group"
        continue
    fi
    for prefix in $prefixes; do
        found=0
        while IFS= read -r -d '' file; do
            drop "$file"
            found=1
        done < <(find "$site/torch/lib" "$site/nvidia" -type f -name "${prefix}*" -print0)
        # The list must stay true to the wheel: a prefix that matches nothing is a stale list.
        [ "$found" = 1 ] || { echo "prune-libs: $prefix ($group) matches no file" >&2; exit 1; }
    done
    echo "prune-libs: left out $group"
done <"$list"
while IFS= read -r -d '' file; do drop "$file"; done \
    < <(find "$site" \( -name '*.a' -o -name '*.bc' -o -name '*.py' -o -name '*.pyc' \) -type f -print0)
find "$site" -depth \( -name include -o -name __pycache__ -o -name libshm -o -name libshm_windows \) \
    -type d -exec rm -rf {} +
echo "prune-libs: $((removed / 1000000)) MB of libraries left out; $(du -sm "$site" | cut -f1) MB kept"
