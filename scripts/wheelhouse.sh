#!/usr/bin/env bash
# Gather, where PyPI is reachable, the wheels that `scripts/gpu_check.sh --wheels DIR` installs
# offline on a GPU machine that already has torch, torchvision, transformers, accelerate and timm:
#
#   scripts/wheelhouse.sh DIR [--python-version 3.12] [--dry-run]
#
# Run it from the project's environment (after `pip install -e .`). The list is pyproject.toml's
# dependencies and build requirements with everything they require, each at the version installed
# here (the versions tested together), with environment markers evaluated for the target Python
# on Linux x86_64. torch, torchvision, torchaudio, triton and nvidia-* (the machine's CUDA build)
# and transformers, accelerate and timm (its own) are neither listed nor followed. Each is
# downloaded as a wheel (`pip download --no-deps --only-binary=:all:`) for CPython of the target
# version on manylinux x86_64 up to manylinux_2_28 (some, pyarrow's, need glibc 2.28 there).
# DeepSpeed publishes only an sdist: unless PyPI has a wheel for it, its wheel is built here
# against this environment's torch (`pip wheel --no-deps --no-build-isolation`, DS_BUILD_OPS=0:
# no op compiled ahead; none of the GPU check's cases uses one). DIR/requirements.txt records the
# list; --dry-run prints it and downloads nothing.
set -euo pipefail

dir=""
pyver="3.12"
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) pyver="${2:?--python-version needs a version such as 3.12}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        -*) echo "wheelhouse: unknown option '$1'" >&2; exit 2 ;;
        *) [ -z "$dir" ] || { echo "wheelhouse: one DIR only ('$dir', '$1')" >&2; exit 2; }; dir=$1; shift ;;
    esac
done
if [ -z "$dir" ]; then
    echo "wheelhouse: usage: scripts/wheelhouse.sh DIR [--python-version 3.12] [--dry-run]" >&2
    exit 2
fi
python=${PYTHON:-python}
root="$(cd "$(dirname "$0")/.." && pwd)"

requirements=$("$python" - "$root/pyproject.toml" "$pyver" <<'PY'
"""Print `name==version` (installed here) or the requirement itself (not installed here) for
every package the project and its build need on the target Python, except the GPU machine's own."""
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

OWN = {"torch", "torchvision", "torchaudio", "triton", "transformers", "accelerate", "timm"}
pyproject, version = sys.argv[1], sys.argv[2]
with open(pyproject, "rb") as f:
    project = tomllib.load(f)
target = {"python_version": version, "python_full_version": f"{version}.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def applies(req: Requirement, extras: frozenset) -> bool:
    return req.marker is None or any(req.marker.evaluate({**target, "extra": e}) for e in {"", *extras})


todo = [(Requirement(r), frozenset()) for r in project["project"]["dependencies"] + project["build-system"]["requires"]]
listed: dict[str, str] = {}
while todo:
    req, parent_extras = todo.pop()
    name = canonicalize_name(req.name)
    if not applies(req, parent_extras) or name in OWN or name.startswith("nvidia-") or name in listed:
        continue
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        listed[name] = f"{name}{req.specifier}"
        continue
    if not req.specifier.contains(dist.version, prereleases=True):
        sys.exit(f"wheelhouse: {name} {dist.version} is installed here but {req} is required; "
                 "pip install -e . first")
    listed[name] = f"{name}=={dist.version}"
    todo.extend((Requirement(r), frozenset(req.extras)) for r in dist.requires or [])
print("\n".join(sorted(listed.values())))
PY
)

if [ "$dry_run" -eq 1 ]; then
    echo "$requirements"
    exit 0
fi

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
echo "$requirements" > "$dir/requirements.txt"
platforms=(--platform manylinux2014_x86_64)
for minor in $(seq 17 28); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
download=("$python" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "$pyver"
          "${platforms[@]}" --dest "$dir")
is_deepspeed='^deepspeed([^a-z0-9_.-]|$)'
deepspeed=$(grep -E "$is_deepspeed" "$dir/requirements.txt")
"${download[@]}" -r <(grep -Ev "$is_deepspeed" "$dir/requirements.txt")
# --no-cache-dir: pip's cache may hold a wheel built here earlier from the sdist, with other flags.
if "${download[@]}" --no-cache-dir "$deepspeed" > /dev/null 2>&1; then
    echo "wheelhouse: $deepspeed: wheel from PyPI"
else
    echo "wheelhouse: $deepspeed: no wheel on PyPI, building one (DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "$python" -m pip wheel --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed \
        --wheel-dir "$dir" "$deepspeed"
fi
echo "wheelhouse: $(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels in $dir for Python $pyver;" \
     "on the GPU machine: scripts/gpu_check.sh --wheels $dir"
