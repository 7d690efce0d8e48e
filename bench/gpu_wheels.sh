#!/usr/bin/env bash
# Download the wheels the GPU check needs into wheels/ (gitignored via .git/info/exclude), for a GPU
# machine that has CUDA torch, transformers, peft and accelerate but no package index.
#
#   bench/gpu_wheels.sh                        # here, where the registry is reachable
#
# What it fetches: trl, datasets and deepspeed at the versions pinned in constraints.txt, plus every
# package they need that is not already required by torch / transformers / peft / accelerate (those
# are on the GPU machine): pyarrow, pandas, dill, xxhash, multiprocess, hjson, pydantic, ... Binary
# wheels are for the GPU machine's platform (manylinux x86_64) and Python (default: this Python;
# set GPU_PYTHON_VERSION=3.12 to match another). deepspeed ships only as a source archive.
# GPU_WHEELS_SKIP="pandas pyarrow" leaves out packages the GPU machine already has (smaller copy).
#
# Then, on the GPU machine, from the repository root (wheels/ carried along):
#
#   pip install --no-index --find-links wheels trl==1.16.0 datasets==5.2.0
#   pip install --no-index --find-links wheels --no-build-isolation deepspeed==0.19.8
#   python -m bench.gpu_check --out $OUT
#
# (the versions are the constraints.txt pins printed at the end of this script; deepspeed builds
# against the installed CUDA torch, hence no build isolation; no constraints file there: it pins the
# CPU torch). The full set is about 70 MB, 55 MB of it pyarrow (a datasets dependency).
#
# The GPU check itself imports neither datasets nor deepspeed: if only a small copy can travel
# (e.g. a 64 MiB limit), GPU_WHEELS_SKIP="pyarrow pandas" bench/gpu_wheels.sh, then on the GPU machine
#
#   pip install --no-index --find-links wheels --no-deps trl==1.16.0
#   python -m bench.gpu_check --out $OUT
#
# The Qwen2.5-VL processor needs torchvision (its video processor); CUDA images ship it with torch.
# If `python -c "import torchvision"` fails there, bring the torchvision wheel matching that torch.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DEST="${DEST:-wheels}"
GPU_PYTHON_VERSION="${GPU_PYTHON_VERSION:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
GPU_WHEELS_SKIP="${GPU_WHEELS_SKIP:-}"
mkdir -p "$DEST"

# The requirement closure, read from this venv's installed metadata (it is constraints.txt's lock).
"$PY" - "$DEST/requirements-gpu.txt" "$GPU_WHEELS_SKIP" <<'PYTHON'
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

out_file, skip = sys.argv[1], {s.lower() for s in sys.argv[2].split()}
WANTED = ("trl", "datasets", "deepspeed")
ON_GPU_MACHINE = ("torch", "transformers", "peft", "accelerate")


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots):
    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency this environment does not use
        seen.add(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            # Linux x86_64 CPython, no extras: the GPU machine's environment.
            if req.marker is None or req.marker.evaluate({"extra": "", "sys_platform": "linux"}):
                todo.append(norm(req.name))
    return seen


pins = {}
for line in open("constraints.txt"):
    if "==" in line and not line.startswith("#"):
        name, version = line.strip().split("==", 1)
        pins[norm(name)] = version
needed = sorted(closure(WANTED) - closure(ON_GPU_MACHINE) - {norm(s) for s in skip})
with open(out_file, "w") as f:
    for name in needed:
        f.write(f"{name}=={pins.get(name) or distribution(name).version}\n")
print(f"{len(needed)} packages: {' '.join(needed)}")
PYTHON

# Binary wheels for the GPU machine's platform; deepspeed (source only) separately.
grep -v '^deepspeed==' "$DEST/requirements-gpu.txt" > "$DEST/requirements-binary.txt"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "$GPU_PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform linux_x86_64 --platform any \
  -r "$DEST/requirements-binary.txt"
if grep -q '^deepspeed==' "$DEST/requirements-gpu.txt"; then
  # Its metadata step imports torch: build against this venv's torch, not an isolated download of one.
  "$PY" -m pip download --quiet --no-deps --no-binary=deepspeed --no-build-isolation --dest "$DEST" \
    "$(grep '^deepspeed==' "$DEST/requirements-gpu.txt")"
fi

du -sh "$DEST"
pin() { grep "^$1==" "$DEST/requirements-gpu.txt"; }
echo "on the GPU machine, from the repository root:"
echo "  pip install --no-index --find-links $DEST $(pin trl) $(pin datasets)"
echo "  pip install --no-index --find-links $DEST --no-build-isolation $(pin deepspeed)"
echo "  python -m bench.gpu_check --out \$OUT"
echo "(the check alone: pip install --no-index --find-links $DEST --no-deps $(pin trl))"
