#!/usr/bin/env bash
# compare_trl.py on a lent GPU machine: one H100/H200, no network, no package index, no
# ../shared/data, no embedded model, no TRL or datasets (see benchmarks/README.md, "On a GPU").
#
#     bash benchmarks/gpu_compare.sh prepare      # here: writes benchmarks/results/gpu_bundle
#     bash benchmarks/gpu_compare.sh run [OPTS]   # there, from the repository root: the --gpu
#                                                 # preset (OPTS go to compare_trl.py)
#
# prepare (a machine with the package registry, ../shared/data and benchmarks/.venv-trl):
#   - the wheels the GPU machine lacks, for CPython $PYV manylinux x86_64, at the versions the
#     benchmark's venv runs (the tested set): TRL, datasets and what datasets needs that the
#     GPU machine's torch/transformers/accelerate/peft stack does not bring (pyarrow, pandas,
#     dill, multiprocess, xxhash, fsspec), pydantic for alignkit (pydantic-core,
#     annotated-types, typing-inspection), and small fallbacks installed there only when
#     missing or too old (pyyaml, typing-extensions, python-dateutil, six, jinja2, markupsafe,
#     tqdm, filelock, packaging, psutil). pyarrow's wheel (55 MB) is repacked without what
#     nothing here loads (Flight, S3, C++ headers and sources, its tests) and pandas' without
#     its tests, so the whole bundle fits the 64 MiB a device call carries;
#   - files.tar.gz: compare_trl.py --gpu --prepare-bundle (the data pools from ../shared/data,
#     the embedded model's config and tokenizer files, bundle.json);
#   - prints the bundle's size (fails over $MAX_MIB MiB) and the device-tool call.
# run (the GPU machine): pip install --no-index --no-deps --target <tmp>/site-packages (the
#   folder name matters: dill pickles modules outside a "site-packages" path by value, which
#   breaks datasets' fingerprints), PYTHONPATH=<that>, files.tar.gz unpacked into
#   $BUNDLE/files, then compare_trl.py --gpu; output (JSON, logs, stdout) to $OUT when set.
#
# Environment: BUNDLE (default benchmarks/results/gpu_bundle, git-ignored: the carry path),
# PYV (3.12), PY (prepare's Python: benchmarks/.venv-trl/bin/python), MAX_MIB (60),
# OUT (run: where results go; default benchmarks/results).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUNDLE="${BUNDLE:-benchmarks/results/gpu_bundle}"
PYV="${PYV:-3.12}"
MAX_MIB="${MAX_MIB:-60}"

# name==version  group  requirement that a copy already on the GPU machine must meet
# core: always installed (and put ahead of any copy there); fallback: only when missing or
# outside the requirement.
PACKAGES='
trl==1.16.0                 core
datasets==5.2.0             core
pyarrow==26.0.1             core
pandas==3.1.1               core
dill==0.4.1                 core
multiprocess==0.70.19       core
xxhash==4.1.0               core
fsspec==2026.9.0            core
pydantic==2.14.4            core
pydantic-core==2.50.5       core
annotated-types==0.8.0      core
typing-inspection==0.4.5    core
pyyaml==6.0.4               fallback >=6.0.1
typing-extensions==4.16.0   fallback >=4.16.0
python-dateutil==2.9.0.post0 fallback >=2.9.0
six==1.17.0                 fallback >=1.5
jinja2==3.1.6               fallback >=3.0
markupsafe==3.0.4           fallback >=2.0
tqdm==4.70.1                fallback >=4.66.3
filelock==4.3.1             fallback >=3.0
packaging==26.4             fallback >20.0
psutil==7.2.2               fallback >=5.9.4
'

prepare() {
    local py="${PY:-}"
    if [ -z "$py" ]; then
        if [ -x benchmarks/.venv-trl/bin/python ]; then py=benchmarks/.venv-trl/bin/python
        else py=python3; fi
    fi
    local stage
    stage="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle-XXXXXX")"
    # shellcheck disable=SC2064  # expanded now: $stage is local
    trap "rm -rf '$stage'" EXIT
    mkdir -p "$stage/wheels"
    local specs
    specs="$(echo "$PACKAGES" | awk 'NF {print $1}')"
    echo "downloading $(echo "$specs" | wc -l) wheels for CPython $PYV manylinux x86_64 ..."
    # shellcheck disable=SC2086
    nice -n 19 python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version "$PYV" --implementation cp --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$stage/wheels" $specs
    echo "repacking pyarrow and pandas without what is never loaded ..."
    nice -n 19 python3 - "$stage/wheels" <<'PY'
import re, sys, zipfile
from pathlib import Path
# Never loaded by datasets/TRL/alignkit here: Flight, S3 (pyarrow.fs skips it when absent),
# the duplicate copies of libarrow_python* (the extensions need only *.so.NNNN), C++
# headers/sources/Cython files, test suites. lib.so links libarrow_substrait: kept.
DROP = {
    "pyarrow": re.compile(r"^pyarrow/(include/|src/|tests/|.*\.(pxd|pyx|pxi|h)$|"
                          r"_pyarrow_cpp_tests|libarrow_flight\.|libarrow_python_flight\.|"
                          r"_flight\.|flight\.py$|libarrow_s3\.|_s3fs\.|"
                          r"libarrow_python(_parquet_encryption)?\.so(\.\d+\.\d+\.\d+)?$)"),
    "pandas": re.compile(r"^pandas/tests/"),
}
for wheel in Path(sys.argv[1]).glob("*.whl"):
    name = wheel.name.split("-")[0].lower()
    if name not in DROP:
        continue
    drop = DROP[name]
    tmp = wheel.with_suffix(".tmp")
    kept = dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED,
                                                        compresslevel=9) as dst:
        for info in src.infolist():
            if drop.search(info.filename):
                dropped += info.file_size
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # forget the dropped files
                data = "".join(ln for ln in data.decode().splitlines(keepends=True)
                               if not drop.search(ln.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            kept += 1
    before = wheel.stat().st_size
    tmp.replace(wheel)
    print(f"  {wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB "
          f"({dropped / 2**20:.0f} MiB unpacked left out)")
PY
    echo "writing the data pools and the model's config and tokenizer ($py) ..."
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" nice -n 19 "$py" benchmarks/compare_trl.py \
        --gpu --prepare-bundle "$stage/files"
    tar -czf "$stage/files.tar.gz" -C "$stage/files" .
    echo "$PACKAGES" | awk 'NF' > "$stage/wheels/packages.txt"
    echo "$PYV" > "$stage/wheels/python-version"
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE"
    mv "$stage/wheels" "$stage/files.tar.gz" "$BUNDLE/"
    echo
    (cd "$BUNDLE" && ls -l wheels/*.whl files.tar.gz \
        | awk '{printf "  %8.2f MiB  %s\n", $5 / 2^20, $NF}')
    local bundle_b tree_b
    bundle_b=$(du -sb "$BUNDLE" | cut -f1)
    # What a device call copies besides: tracked and untracked-but-not-ignored files.
    tree_b=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
              | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    awk -v b="$bundle_b" -v t="$tree_b" -v p="$BUNDLE" 'BEGIN {
        printf "bundle: %.1f MiB (%s); working tree: %.1f MiB; together %.1f of 64 MiB\n",
               b / 2^20, p, t / 2^20, (b + t) / 2^20}'
    if [ "$bundle_b" -gt $((MAX_MIB * 1048576)) ] || \
       [ $((bundle_b + tree_b)) -gt $((64 * 1048576)) ]; then
        echo "too big: the bundle must stay under $MAX_MIB MiB and the total under 64 MiB" >&2
        exit 1
    fi
    echo
    echo "device-tool call (one H100 or H200; ~8 minutes of run time):"
    echo "  run(command=\"bash benchmarks/gpu_compare.sh run\", carry=[\"$BUNDLE\"], timeout_s=570)"
}

run() {
    [ -d "$BUNDLE/wheels" ] && [ -f "$BUNDLE/files.tar.gz" ] || {
        echo "no bundle at $BUNDLE: run 'bash benchmarks/gpu_compare.sh prepare' on a machine" \
             "with the package index and carry $BUNDLE" >&2; exit 1; }
    local py="${PY:-python3}" want have
    want="$(cat "$BUNDLE/wheels/python-version")"
    have="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$want" != "$have" ]; then
        echo "the wheels are for Python $want, this is $have: prepare with PYV=$have" >&2
        exit 1
    fi
    local out="${OUT:-$ROOT/benchmarks/results}" work site
    mkdir -p "$out"
    work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-compare-XXXXXX")"
    site="$work/site-packages"   # the name matters (dill), see the header
    # Which wheels: every core one; a fallback one where this Python lacks the package or has
    # a version outside the requirement (packaging decides; without packaging: all of them).
    local wheels
    wheels="$("$py" - "$BUNDLE/wheels" <<'PY'
import sys
from importlib import metadata
from pathlib import Path
folder = Path(sys.argv[1])
try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    SpecifierSet = None
norm = lambda s: s.lower().replace("-", "_").replace(".", "_")
files = {norm(w.name.split("-")[0]): w for w in folder.glob("*.whl")}
for line in (folder / "packages.txt").read_text().splitlines():
    spec, group, *req = line.split()
    name = spec.split("==")[0]
    if group == "fallback" and SpecifierSet is not None:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and have in SpecifierSet(req[0] if req else ""):
            print(f"  {name} {have} already here", file=sys.stderr)
            continue
    print(files[norm(name)])
PY
)"
    echo "installing $(echo "$wheels" | wc -l) wheels into $site ..."
    # shellcheck disable=SC2086
    if "$py" -m pip --version >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --disable-pip-version-check \
            --target "$site" $wheels
    else  # no pip: a wheel is a zip laid out for site-packages
        echo "  (no pip here: unpacking the wheels)"
        "$py" -c 'import sys, zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' \
            "$site" $wheels
    fi
    rm -rf "$BUNDLE/files"
    mkdir -p "$BUNDLE/files"
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$BUNDLE/files.tar.gz" "$BUNDLE/files"
    export PYTHONPATH="$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # alignkit from the checkout
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
           TOKENIZERS_PARALLELISM=false
    "$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
for m in ("transformers", "accelerate", "peft", "huggingface_hub", "trl", "datasets", "pyarrow",
          "pandas", "pydantic", "yaml", "numpy"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except Exception as err:  # noqa: BLE001 - a report, not a check
        print(f"  {m}: {type(err).__name__}: {err}")
PY
    set +e
    "$py" benchmarks/compare_trl.py --gpu --data-dir "$BUNDLE/files" \
        --output "$out/compare_trl-gpu.json" --logs "$out/logs" "$@" 2>&1 \
        | tee "$out/stdout.txt"
    local rc=${PIPESTATUS[0]}
    set -e
    rm -rf "$work"
    exit "$rc"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
