#!/usr/bin/env bash
# The GPU benchmark in one command (docs/benchmarks.md, "GPU (H100/H200)").
#
#   bash bench/gpu.sh --prepare      # once, on a machine with PyPI access: wheels into bench/out/wheelhouse
#   bash bench/gpu.sh [gpu.py args]  # on the GPU machine (no network needed): environments, then bench/gpu.py
#
# The GPU machine's own python3 (PYTHON=... to choose another) must hold a CUDA torch. On top of it this script
# builds two environments from the wheelhouse, without any index:
#   diffrl: a venv that sees python3's packages, plus diffusers 0.42.1 and peft 0.21.2, and this checkout's src/
#           (a .pth file; nothing is installed there);
#   deepspeed: the diffrl venv plus DeepSpeed 0.19.8 and what it needs beyond python3's packages, for the ZeRO-2
#           smoke runs only (with DeepSpeed importable, accelerate and transformers import it on every save);
#   trl:    a venv that sees python3's packages, plus trl 0.23.1 and the versions it needs (transformers 4.57.6,
#           tokenizers 0.22.1, huggingface-hub 0.36.0, diffusers 0.35.2, peft 0.21.2: the set run on the CPU
#           beside diffrl), which shadow python3's newer ones.
# Both venvs see python3's torch, accelerate, numpy... through a .pth file, so nothing large is carried. A package
# already importable in python3 at the pinned version is not needed in the wheelhouse; a missing one is reported.
# The wheelhouse is about 33 MB; the device tool carries it when bench/out/wheelhouse is named in `carry`.
# Results go to $OUT/gpu.json and $OUT/gpu.md when OUT is set, else bench/results/gpu/<date>-<commit>.json (and .md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${DIFFRL_WHEELHOUSE:-$ROOT/bench/out/wheelhouse}"
ENVS="${DIFFRL_GPU_ENVS:-/tmp/diffrl-gpu-envs}"
PY="${PYTHON:-python3}"
GPU_PYTHON_VERSION="${GPU_PYTHON_VERSION:-3.12}"   # the GPU image's python3 (device docs: Python 3.12.3)

DIFFRL_WHEELS=(diffusers==0.42.1 peft==0.21.2)
DEEPSPEED_WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
TRL_WHEELS=(trl==0.23.1 transformers==4.57.6 tokenizers==0.22.1 huggingface-hub==0.36.0 diffusers==0.35.2 peft==0.21.2)
DEEPSPEED=deepspeed==0.19.8

prepare() {
  # Binary wheels for the GPU machine's Python and platform; DeepSpeed ships only a source archive, so it is
  # built here into a pure-Python wheel (DS_BUILD_OPS=0: no CUDA kernels compiled ahead; needs torch in $PY).
  local download=("$PY" -m pip download --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION"
                  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
                  --platform manylinux2014_x86_64)
  mkdir -p "$WHEELS/diffrl" "$WHEELS/trl" "$WHEELS/deepspeed"
  "${download[@]}" -d "$WHEELS/diffrl" "${DIFFRL_WHEELS[@]}"
  "${download[@]}" -d "$WHEELS/trl" "${TRL_WHEELS[@]}"
  "${download[@]}" -d "$WHEELS/deepspeed" "${DEEPSPEED_WHEELS[@]}"
  if ! ls "$WHEELS"/deepspeed/deepspeed-*.whl >/dev/null 2>&1; then
    local src; src="$(mktemp -d)"
    "$PY" -m pip download --no-deps --no-binary=:all: -d "$src" "$DEEPSPEED"
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$WHEELS/deepspeed" "$src"/deepspeed-*.tar.gz
    rm -rf "$src"
  fi
  du -sh "$WHEELS"
  echo "wheelhouse ready: carry bench/out/wheelhouse to the GPU machine (device tool: carry=[\"bench/out/wheelhouse\"])"
}

make_env() {  # make_env NAME EXTRA_PATH WHEEL_DIR...: a venv over $PY's packages, the wheels installed into it
  local name="$1" extra="$2" dir="$ENVS/$1"
  shift 2
  rm -rf "$dir"
  "$PY" -m venv --without-pip "$dir" >&2
  local site; site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # The parent's site-packages come after the venv's own (so the wheels here shadow the parent's versions);
  # addsitedir also runs the parent's .pth files. A parent that is itself a venv is handled the same way.
  "$PY" -c 'import site, sys; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
    > "$site/zz_parent_site.pth"
  if [ -n "$extra" ]; then echo "$extra" > "$site/aa_extra_path.pth"; fi
  local wheels=()
  for folder in "$@"; do
    for wheel in "$folder"/*.whl; do
      if [ -f "$wheel" ]; then wheels+=("$wheel"); fi
    done
  done
  if [ "${#wheels[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}" >&2
  fi
  echo "$dir/bin/python"
}

if [ "${1:-}" = "--prepare" ]; then
  shift
  prepare "$@"
  exit 0
fi

start=$(date +%s)
mkdir -p "$ENVS"
DIFFRL_PY="$(make_env diffrl "$ROOT/src" "$WHEELS/diffrl")"
if ! "$DIFFRL_PY" -c 'import torch, diffusers, peft, accelerate, transformers, diffrl' 2>"$ENVS/diffrl-import.log"; then
  echo "the diffrl environment cannot import its packages (see $ENVS/diffrl-import.log):" >&2
  tail -3 "$ENVS/diffrl-import.log" >&2
  echo "run 'bash bench/gpu.sh --prepare' where PyPI is reachable and carry bench/out/wheelhouse here" >&2
  exit 2
fi
TRL_ARGS=()
if ls "$WHEELS"/trl/*.whl >/dev/null 2>&1; then
  TRL_PY="$(make_env trl "" "$WHEELS/trl")"
elif "$PY" -c 'import trl, sys; sys.exit(trl.__version__ != "0.23.1")' 2>/dev/null; then
  TRL_PY="$PY"
else
  TRL_PY=""
  TRL_ARGS=(--trl-note "not run: no TRL 0.23.1 here and no wheelhouse ($WHEELS/trl); run bash bench/gpu.sh --prepare")
fi
if [ -n "$TRL_PY" ]; then
  if "$TRL_PY" -c 'import trl, diffusers; assert trl.__version__ == "0.23.1"' 2>"$ENVS/trl-import.log"; then
    TRL_ARGS=(--trl-python "$TRL_PY")
  else
    TRL_ARGS=(--trl-note "not run: the TRL environment does not import: $(tail -1 "$ENVS/trl-import.log")")
  fi
fi
DS_ARGS=()
if ls "$WHEELS"/deepspeed/deepspeed-*.whl >/dev/null 2>&1; then
  DS_PY="$(make_env deepspeed "$ROOT/src" "$WHEELS/diffrl" "$WHEELS/deepspeed")"
  DS_ARGS=(--deepspeed-python "$DS_PY")
fi
echo "environments ready in $(( $(date +%s) - start )) s: diffrl $DIFFRL_PY; ${TRL_ARGS[*]} ${DS_ARGS[*]}" >&2
cd "$ROOT"
exec "$DIFFRL_PY" bench/gpu.py "${TRL_ARGS[@]}" "${DS_ARGS[@]}" "$@"
