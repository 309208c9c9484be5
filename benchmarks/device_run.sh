#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmark suites. Run from the repo root:
#   bash benchmarks/device_run.sh [SUITES...]      (default: gpu-tests swap forward fullgraph)
# A step probe:NAME[:ARG,ARG] runs benchmarks/experiments/NAME.py with those arguments (its printout
# in $OUT/NAME[-ARG-ARG].log).
# Wheels for packages the device lacks (google-re2; pytest/hypothesis where missing; diffusers and
# what it imports that torch/transformers/peft do not bring: Pillow, requests and its four, and
# huggingface_hub >= 1.32) travel in .whl/ (name it in the call's carry). A wheel is installed only
# where the device has no such distribution or an older one (/tmp/site comes first on the path,
# so it would shadow the device's own). Results land in $OUT if set. TESTS_TIMEOUT and SUITE_TIMEOUT
# (seconds; 300 and 560) bound the GPU tests and each suite, so a call ends inside its limit; TESTS
# (default tests) names the test files or folders the GPU tests come from. LORAHOT_COMMIT names the
# code measured, for the run files, where the checkout has no .git (a `git archive` export).
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LORAHOT_COMMIT=${LORAHOT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
if ls .whl/*.whl >/dev/null 2>&1; then
  need=$(python3 - .whl/*.whl <<'EOF_PY'
import importlib.metadata as md, os, sys
from packaging.version import Version
for wheel in sys.argv[1:]:
    dist, version = os.path.basename(wheel).split("-")[:2]
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(version):
        print(wheel)
    else:
        print(f"{dist} {have} installed, {version} not needed", file=sys.stderr)
EOF_PY
)
  if [ -n "$need" ]; then
    echo "installing to /tmp/site:" $need
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $need && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
fi
OUT=${OUT:-/tmp/lorahot-out}; mkdir -p "$OUT"
STAMP=$(mktemp); touch "$STAMP"  # only this call's run files go back (a call returns a few files)
python3 -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
for step in "${@:-gpu-tests swap forward fullgraph}"; do
  for s in $step; do
    echo "=== $s $(date +%T)"
    case $s in
      gpu-tests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=short ${TESTS:-tests} 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
      probe:*) p=${s#probe:}; name=${p%%:*}; args=; [ "$p" != "$name" ] && args=${p#*:}
        timeout ${SUITE_TIMEOUT:-560} python3 -m "benchmarks.experiments.$name" ${args//,/ } 2>&1 | tee "$OUT/$name${args:+-${args//,/-}}.log" | grep -v '^ ' | tail -40 ;;
      swap|forward|fullgraph|rows|stack|mixed|diffusion) timeout ${SUITE_TIMEOUT:-560} python3 -m benchmarks.run --suite "$s" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-$s.log" | grep -v '^ ' | tail -40 ;;
    esac
  done
done
cp benchmarks/results/latest.json "$OUT/" 2>/dev/null
find benchmarks/results/runs -name "*.json" -newer "$STAMP" -exec cp {} "$OUT/" \;
ls "$OUT"
