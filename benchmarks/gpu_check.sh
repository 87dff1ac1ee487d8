#!/usr/bin/env bash
# GPU check, in one run of about 8 minutes at most, written to benchmarks/results/gpu.md:
#
#   1. packages: MONAI, nibabel and jsonargparse[signatures] are installed from carried wheels when missing
#      (a bare GPU machine has PyTorch, CUDA, cupy and Lightning but not these; nothing can be downloaded there);
#   2. the GPU tests: `pytest -m gpu` (cupy glue, solves, a LearnGN training step per backend against the CPU,
#      train.py fit and eval.py on CUDA);
#   3. the platform check: the whole default suite (GPU tests included) under `pytest -n 8` with 16 torch
#      threads per test, on a many-core machine with CUDA visible (needs pytest-xdist, carried as a wheel);
#   4. benchmarks/gn_layer.py on cuda with every backend (torch, graph, cupy), against the targets (forward ≤ 2 ms, forward+backward ≤ 4 ms at 56×48×56);
#   5. eval.py on BrainPair (handcrafted GN on MIND, configs/baselines/gn_mind.yaml) on the GPU with the cupy
#      and the torch backend, when the data is found;
#   6. benchmarks/train_step.py --device cuda --out FILE, when that script exists;
#   7. (step "hippo_eval") eval.py on the 20 Hippocampus val pairs on the GPU: the shipped LearnGN
#      (checkpoints/hippocampus_learngn.ckpt, λ 0.6) and handcrafted GN (the setting chosen in
#      benchmarks/results/hippocampus.md), seconds per pair;
#   8. (step "hippo_train") train.py fit -c configs/hippocampus3d.yaml on the GPU, once per variant of
#      GPU_TRAIN_VARIANTS ("name:extra CLI args;name2:..."), timed; the exported weights and metrics.csv of
#      each variant are copied to $OUT (the training runs write runs/hippocampus3d of the copy they run in).
#
# Every step is bounded by the remaining time budget; a step that fails or is skipped is reported as such and
# the script goes on. Without CUDA (a dry run) the GPU steps report "no CUDA" and the report goes to a scratch
# folder, marked as a dry run, not to benchmarks/results/gpu.md.
#
# Usage
#   bash benchmarks/gpu_check.sh --stage   # here, where pip reaches the package index: download the wheels into
#                                          # .whl/ and copy BrainPair into .gpu_data/ (both git-ignored)
#   bash benchmarks/gpu_check.sh           # on the GPU machine (or: make gpu-check)
# With the workplace's device tool: run `bash benchmarks/gpu_check.sh` with carry [".whl", ".gpu_data"]; the
# report and the log are also copied to $OUT when it is set.
#
# Environment
#   PYTHON            interpreter that has torch (default: python3)
#   WHEELS            folder of carried wheels (default: .whl)
#   L2O_SHARED_DATA   data root holding BrainPair/ (default: .gpu_data when it exists, else ../shared/data)
#   GPU_CHECK_MD      report path (default: benchmarks/results/gpu.md with CUDA, <scratch>/gpu.md without)
#   GPU_CHECK_WORK    scratch folder for outputs and logs (default: a new temporary folder)
#   GPU_CHECK_BUDGET  seconds for the whole check (default: 470)
#   GPU_CHECK_STEPS   steps to run, in this order: a list from "tests platform gn_layer eval train_step
#                     hippo_eval hippo_train" (default "platform gn_layer train_step hippo_eval eval": the
#                     platform step already runs the GPU tests; the run of 2026-11-27 took 480 s for these)
#   GPU_TRAIN_VARIANTS  variants of step hippo_train (default "recipe:")

set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUDGET=${GPU_CHECK_BUDGET:-470}
STEPS=${GPU_CHECK_STEPS:-"platform gn_layer train_step hippo_eval eval"}
TRAIN_VARIANTS=${GPU_TRAIN_VARIANTS:-"recipe:"}
# the pure-Python packages a bare GPU image lacks (jsonargparse[signatures] = docstring-parser + typeshed-client;
# typing-extensions, PyYAML, packaging and numpy are there); versions: the ones this project is developed with
STAGE_PACKAGES="monai nibabel jsonargparse docstring-parser typeshed-client pytest-xdist execnet"

# ------------------------------------------------------------------------------------------------ staging
if [ "${1:-}" = "--stage" ]; then
    mkdir -p "$WHEELS" .gpu_data
    exclude=$(git rev-parse --git-path info/exclude 2>/dev/null)
    for dir in "$WHEELS" .gpu_data; do  # carried to the GPU machine, never committed: ignored locally
        if ! git check-ignore -q "$dir" 2>/dev/null && [ -n "$exclude" ]; then
            mkdir -p "$(dirname "$exclude")" && echo "/$dir/" >> "$exclude"
        fi
    done
    for name in $STAGE_PACKAGES; do
        version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null)
        spec=$name${version:+==$version}
        rm -f "$WHEELS/$(echo "$name" | tr - _)"-*.whl "$WHEELS/$name"-*.whl
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "$spec" || exit 1
    done
    data=${L2O_SHARED_DATA:-../shared/data}
    for set in BrainPair Hippocampus; do
        if [ -d "$data/$set" ]; then
            rm -rf ".gpu_data/$set" && cp -r "$data/$set" .gpu_data/ && chmod -R u+w .gpu_data
        else
            echo "no $set under $data: the steps that use it will be skipped on the GPU machine"
        fi
    done
    ls -l "$WHEELS"
    du -sh "$WHEELS" .gpu_data
    echo "carry: [\"$WHEELS\", \".gpu_data\"]; command: bash benchmarks/gpu_check.sh"
    exit 0
fi

# ------------------------------------------------------------------------------------------------ helpers
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
LOG=$WORK/gpu_check.log
: > "$LOG"
START=$SECONDS
BODY=$WORK/body.md
: > "$BODY"

say() { echo "$*" | tee -a "$LOG"; }
md() { printf '%s\n' "$@" >> "$BODY"; }
remaining() { echo $((BUDGET - (SECONDS - START))); }
# bounded() CAP CMD...: run CMD with a timeout of min(CAP, remaining budget - 5 s); output appended to $LOG and
# kept in $WORK/last.out; returns the command's status (124 on timeout, 125 when no time is left)
bounded() {
    local cap=$1 left
    shift
    left=$(($(remaining) - 5))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 10 ]; then
        echo "(no time left in the budget)" > "$WORK/last.out"
        return 125
    fi
    say "\$ $* (timeout ${cap}s)"
    timeout --kill-after=10 "$cap" "$@" > "$WORK/last.out" 2>&1
    local rc=$?
    cat "$WORK/last.out" >> "$LOG"
    return $rc
}
status_word() {  # status_word RC
    case $1 in 0) echo "ok" ;; 124|137) echo "TIMEOUT" ;; 125) echo "SKIPPED (budget spent)" ;; *) echo "FAILED (exit $1)" ;; esac
}
pytest_summary() {  # the closing line of a pytest run in $WORK/last.out
    grep -E "(passed|failed|skipped|error|no tests ran)" "$WORK/last.out" | grep -E " in [0-9.]+s" | tail -n 1
}
tail_block() {  # tail_block N: the last N lines of $WORK/last.out as a fenced block in the report
    md '```' "$(tail -n "$1" "$WORK/last.out")" '```'
}
summary_row() {  # summary_row SUMMARY.json: "pairs | failed | Dice | SDlogJ | folding | s/pair"
    "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import json
import sys

s = json.load(open(sys.argv[1]))
m = s["metrics"]


def f(key, fmt):
    return "n/a" if m.get(key) is None else format(m[key], fmt)


print(f"{s['n_pairs']} | {s['n_failed']} | {f('dice', '.4f')} | {f('sdlogj', '.3f')} | {f('folding', '.4f')} | "
      f"{f('seconds', '.3f')}")
EOF
}

# ------------------------------------------------------------------------------------------------ packages
say "== packages ($(date -u +%FT%TZ))"
check_imports() {
    "$PYTHON" - <<'EOF'
import importlib
missing = []
for name in ("torch", "lightning", "monai", "nibabel", "jsonargparse", "docstring_parser", "typeshed_client"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name} ({type(exc).__name__})")
print(" ".join(missing))
EOF
}
missing=$(check_imports)
installed=""
if [ -n "$missing" ]; then
    say "missing: $missing"
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        SITE=${GPU_CHECK_SITE:-/tmp/l2o_site}
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl >> "$LOG" 2>&1; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
            installed=$(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')
            missing=$(check_imports)
        else
            say "pip install from $WHEELS failed (see the log)"
        fi
    else
        say "no wheels in $WHEELS (stage them with: bash benchmarks/gpu_check.sh --stage)"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

DEVICE_INFO=$("$PYTHON" - <<'EOF' 2>&1
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import lightning
    print(f"lightning {lightning.__version__}")
except Exception as exc:  # noqa: BLE001
    print(f"lightning: {type(exc).__name__}")
try:
    import cupy
    print(f"cupy {cupy.__version__}")
except Exception as exc:  # noqa: BLE001
    print(f"cupy: not importable ({type(exc).__name__})")
try:
    from layers.cupy_backend import cupy_available
    print(f"cupy backend usable: {cupy_available()}")
except Exception as exc:  # noqa: BLE001
    print(f"layers.cg: {type(exc).__name__}: {exc}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"compute capability {p.major}.{p.minor}")
else:
    print("GPU: no CUDA")
EOF
)
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAVE_CUDA=1
else
    HAVE_CUDA=0
fi
DRIVER=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
CPU=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
say "$DEVICE_INFO"
say "nvidia-smi: ${DRIVER:-n/a}; CPU: ${CPU:-?}, $(nproc) cores"
if [ -n "${GPU_CHECK_MD:-}" ]; then
    REPORT=$GPU_CHECK_MD
elif [ "$HAVE_CUDA" = 1 ]; then
    REPORT=$ROOT/benchmarks/results/gpu.md
else
    REPORT=$WORK/gpu.md
fi

md "## Setup" ""
md "- device: $(echo "$DEVICE_INFO" | grep '^GPU' | sed 's/^GPU: //')" \
   "- nvidia-smi: ${DRIVER:-n/a}" \
   "- CPU: ${CPU:-?}, $(nproc) logical cores" \
   "- software: $(echo "$DEVICE_INFO" | grep -v '^GPU' | tr '\n' ';' | sed 's/;$//; s/;/; /g')" \
   "- installed from carried wheels: ${installed:-none needed}" \
   "- still missing: ${missing:-nothing}" ""

# ------------------------------------------------------------------------------------------------ 2. GPU tests
step_tests() {
    say "== GPU tests"
    md "## GPU tests (\`pytest -m gpu\`)" ""
    if [ "$HAVE_CUDA" = 0 ]; then
        md "no CUDA: the GPU tests only show that they skip cleanly." ""
    fi
    bounded 200 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=8 tests
    rc=$?
    md "- status: $(status_word $rc); result: \`$(pytest_summary)\`" ""
    tail_block 40
    md ""
}

# ------------------------------------------------------------------------------------------------ 3. platform
step_platform() {
    say "== platform check (the default suite, pytest -n 8, 16 threads per test)"
    md "## Platform check (\`L2O_TEST_THREADS=16 pytest -n 8\`: the whole default suite, GPU tests included)" ""
    if "$PYTHON" -c "import xdist" 2>/dev/null; then
        bounded 200 env L2O_TEST_THREADS=16 "$PYTHON" -m pytest -q -n 8 -p no:cacheprovider -rfE tests
        rc=$?
        md "- status: $(status_word $rc); result: \`$(pytest_summary)\`" ""
        [ "$rc" = 0 ] || tail_block 40
    else
        md "- pytest-xdist is not installed: the GPU tests alone, in one process (\`pytest -m gpu\`)" ""
        bounded 200 env L2O_TEST_THREADS=16 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfEs tests
        rc=$?
        md "- status: $(status_word $rc); result: \`$(pytest_summary)\`" ""
        [ "$rc" = 0 ] || tail_block 40
    fi
    md ""
}

# ------------------------------------------------------------------------------------------------ 4. GN layer
step_gn_layer() {
    say "== GN layer benchmark"
    md "## GN solve (\`python -m benchmarks.gn_layer --device cuda\`, every backend)" ""
    if [ "$HAVE_CUDA" = 0 ]; then
        md "- no CUDA: not run" ""
    else
        bounded 170 "$PYTHON" -m benchmarks.gn_layer --device cuda --out "$WORK/gn_layer_gpu.md"
        rc=$?
        cp "$WORK/last.out" "$WORK/gn_layer_gpu.log"
        md "- status: $(status_word $rc)" ""
        "$PYTHON" - "$WORK/gn_layer_gpu.log" >> "$BODY" 2>> "$LOG" <<'EOF'
import json
import sys

rows = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line.startswith("{"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
# before the GPU-path optimisation: H200, torch 2.11 (median); the graph backend replays the torch backend's PCG
before = {"torch": (11.5, 20.6), "graph": (11.5, 20.6), "cupy": (13.5, 29.9)}
print("Against the targets at 56×48×56 (full coupling, float32, rtol 1e-3): forward ≤ 2 ms, "
      "forward+backward ≤ 4 ms. `before` = the figures before the GPU-path optimisation (H200, torch 2.11).")
print()
print("| grid | backend | fwd ms | fwd+bwd ms | its | bwd its | rel. res. | target fwd / fwd+bwd | met | before |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    big = r["grid"] == "56×48×56"
    met = ("yes" if r["fwd_ms"] <= 2.0 and r["fwd_bwd_ms"] <= 4.0 else "no") if big else ""
    prev = before.get(r["backend"]) if big else None
    print(f"| {r['grid']} | {r['backend']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['its']} | "
          f"{r['its_bwd']} | {r['rel_res']:.2e} | {'2 / 4' if big else ''} | {met} | "
          f"{f'{prev[0]} / {prev[1]}' if prev else ''} |")
print()
EOF
        if [ -f "$WORK/gn_layer_gpu.md" ]; then
            md "Full table (written by the benchmark):" ""
            sed -n '/^| grid/,$p' "$WORK/gn_layer_gpu.md" >> "$BODY"
        else
            tail_block 30
        fi
        md ""
    fi
}

# ------------------------------------------------------------------------------------------------ 5. BrainPair
step_eval() {
    say "== eval.py on BrainPair"
    md "## eval.py on BrainPair (handcrafted GN, \`configs/baselines/gn_mind.yaml\`, both directions)" ""
    DATA=${L2O_SHARED_DATA:-}
    if [ -z "$DATA" ]; then
        if [ -d .gpu_data/BrainPair ]; then DATA=.gpu_data; else DATA=../shared/data; fi
    fi
    JSON=$DATA/BrainPair/BrainPair_dataset.json
    if [ "$HAVE_CUDA" = 0 ]; then
        md "- no CUDA: not run" ""
    elif [ ! -f "$JSON" ]; then
        md "- SKIPPED: no BrainPair at $DATA (stage it with \`bash benchmarks/gpu_check.sh --stage\` and carry .gpu_data)" ""
    else
        md "CPU reference (\`benchmarks/results/baselines.md\`, 2 CPU cores): Dice 0.6804, SDlogJ 0.177, 6.4 s per pair." \
           "\`s/pair\` is the registration alone (summary.json \`seconds\`), \`wall s\` the whole eval.py command." "" \
           "| backend | pairs | failed | Dice | SDlogJ | folding | s/pair | wall s | status |" \
           "|---|---|---|---|---|---|---|---|---|"
        for backend in graph cupy torch; do
            out=$WORK/brainpair_gn_$backend
            t0=$(date +%s%N)
            bounded 100 "$PYTHON" eval.py --method gn --method-config configs/baselines/gn_mind.yaml \
                --method-arg "solver={backend: $backend}" --data "$JSON" --split val --out "$out" --overwrite \
                --accelerator gpu --devices 1
            rc=$?
            ms=$((($(date +%s%N) - t0) / 1000000))
            wall=$(printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)))
            row=$(summary_row "$out/summary.json")
            md "| $backend | ${row:-n/a | n/a | n/a | n/a | n/a | n/a} | ${wall} | $(status_word $rc) |"
            [ "$rc" = 0 ] || cp "$WORK/last.out" "$WORK/brainpair_$backend.err"
        done
        md ""
        for backend in graph cupy torch; do
            if [ -f "$WORK/brainpair_$backend.err" ]; then
                md "$backend backend, end of the output:" '```' "$(tail -n 25 "$WORK/brainpair_$backend.err")" '```' ""
            fi
        done
    fi
}

# ------------------------------------------------------------------------------------------------ 6. training step
step_train_step() {
    if [ -f benchmarks/train_step.py ]; then
        say "== training-step benchmark"
        md "## Training step (\`python -m benchmarks.train_step --device cuda\`)" ""
        if [ "$HAVE_CUDA" = 0 ]; then
            md "- no CUDA: not run" ""
        else
            bounded 150 "$PYTHON" -m benchmarks.train_step --device cuda --out "$WORK/train_step_gpu.md"
            rc=$?
            md "- status: $(status_word $rc)" ""
            if [ -f "$WORK/train_step_gpu.md" ]; then
                cat "$WORK/train_step_gpu.md" >> "$BODY"
            else
                tail_block 30
            fi
            md ""
        fi
    fi
}

# ------------------------------------------------------------------------------------------------ 7-8. Hippocampus
HDATA=${L2O_SHARED_DATA:-}
if [ -z "$HDATA" ]; then
    if [ -d .gpu_data/Hippocampus ]; then HDATA=.gpu_data; else HDATA=../shared/data; fi
fi
HJSON=$HDATA/Hippocampus/Hippocampus_dataset.json
step_hippo_eval() {
    say "== eval.py on the Hippocampus val pairs"
    md "## eval.py on the 20 Hippocampus val pairs (GPU)" ""
    if [ "$HAVE_CUDA" = 0 ]; then
        md "- no CUDA: not run" ""
    elif [ ! -f "$HJSON" ]; then
        md "- SKIPPED: no Hippocampus at $HDATA (stage it with \`bash benchmarks/gpu_check.sh --stage\`)" ""
    else
        md "CPU reference (\`benchmarks/results/hippocampus.md\`, 2 CPU cores): LearnGN 0.7532 / 1.47 s per pair," \
           "handcrafted GN 0.7193 / 0.47 s per pair." "" \
           "| method | pairs | failed | Dice | SDlogJ | folding | s/pair | wall s | status |" \
           "|---|---|---|---|---|---|---|---|---|"
        for spec in "learngn|--method learngn --ckpt checkpoints/hippocampus_learngn.ckpt --lam 0.6" \
                    "gn_mind_0.3|--method gn --method-arg lam=[0.3,0.03]"; do
            name=${spec%%|*}
            read -r -a margs <<< "${spec#*|}"
            out=$WORK/hippo_$name
            t0=$(date +%s%N)
            bounded 120 "$PYTHON" eval.py "${margs[@]}" --data "$HJSON" --split val --out "$out" --overwrite \
                --figures 0 --accelerator gpu --devices 1
            rc=$?
            ms=$((($(date +%s%N) - t0) / 1000000))
            row=$(summary_row "$out/summary.json")
            md "| $name | ${row:-n/a | n/a | n/a | n/a | n/a | n/a} | $((ms / 1000)).$((ms % 1000 / 100)) | $(status_word $rc) |"
            [ "$rc" = 0 ] || md "" '```' "$(tail -n 20 "$WORK/last.out")" '```' ""
        done
        md ""
    fi
}
step_hippo_train() {
    say "== train.py fit -c configs/hippocampus3d.yaml on the GPU"
    md "## Training the Hippocampus recipe on the GPU (\`train.py fit -c configs/hippocampus3d.yaml\`)" ""
    if [ "$HAVE_CUDA" = 0 ]; then
        md "- no CUDA: not run" ""
    elif [ ! -f "$HJSON" ]; then
        md "- SKIPPED: no Hippocampus at $HDATA" ""
    else
        md "CPU reference: 65.5 min wall on 2 shared CPU cores (\`benchmarks/results/hippocampus_training.md\`)." "" \
           "| variant | extra arguments | wall s | final val/dice | status |" "|---|---|---|---|---|"
        IFS=';' read -r -a variants <<< "$TRAIN_VARIANTS"
        for variant in "${variants[@]}"; do
            name=${variant%%:*}
            read -r -a extra <<< "${variant#*:}"
            rm -rf runs/hippocampus3d
            t0=$(date +%s%N)
            bounded 400 "$PYTHON" train.py fit -c configs/hippocampus3d.yaml --data.source "$HJSON" \
                --data.num_workers 4 --trainer.accelerator gpu --trainer.devices 1 "${extra[@]}"
            rc=$?
            ms=$((($(date +%s%N) - t0) / 1000000))
            dice=$("$PYTHON" - runs/hippocampus3d/logs/metrics.csv <<'EOF' 2>/dev/null
import csv
import sys

rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("val/dice")]
print(f"{float(rows[-1]['val/dice']):.4f} (epoch {rows[-1]['epoch']})")
EOF
)
            md "| $name | \`${extra[*]}\` | $((ms / 1000)).$((ms % 1000 / 100)) | ${dice:-n/a} | $(status_word $rc) |"
            [ "$rc" = 0 ] || md "" '```' "$(tail -n 20 "$WORK/last.out")" '```' ""
            if [ -f runs/hippocampus3d/checkpoints/last.ckpt ]; then
                "$PYTHON" -m data.checkpoint runs/hippocampus3d/checkpoints/last.ckpt \
                    "$WORK/hippo_$name.ckpt" >> "$LOG" 2>&1
                cp runs/hippocampus3d/logs/metrics.csv "$WORK/hippo_${name}_metrics.csv" 2>/dev/null
            fi
            rm -rf "$WORK/h3d_$name" && mv runs/hippocampus3d "$WORK/h3d_$name" 2>/dev/null
        done
        md ""
    fi
}

# ------------------------------------------------------------------------------------------------ run the steps
# in the order of GPU_CHECK_STEPS (put the most important first: each is bounded by what is left)
for step in $STEPS; do
    if declare -F "step_$step" > /dev/null; then
        "step_$step"
    else
        say "unknown step: $step"
        md "- unknown step \`$step\` (known: tests platform gn_layer eval train_step hippo_eval hippo_train)" ""
    fi
done

# ------------------------------------------------------------------------------------------------ report
ELAPSED=$((SECONDS - START))
{
    echo "# GPU check (\`benchmarks/gpu_check.sh\`)"
    echo
    if [ "$HAVE_CUDA" = 0 ]; then
        echo "**DRY RUN without CUDA: not a GPU result.** The GPU steps report \"no CUDA\"; only the packages, the"
        echo "skipping of the GPU tests and the CPU platform check ran."
        echo
    fi
    echo "Written by \`benchmarks/gpu_check.sh\` on $(date -u +%F) in ${ELAPSED} s (budget ${BUDGET} s); do not edit by hand."
    echo
    cat "$BODY"
} > "$WORK/gpu.md"
mkdir -p "$(dirname "$REPORT")"
[ "$REPORT" = "$WORK/gpu.md" ] || cp "$WORK/gpu.md" "$REPORT"
say "report: $REPORT (${ELAPSED} s); log: $LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$WORK/gpu.md" "$LOG" "$OUT/" 2>/dev/null
    [ -f "$WORK/gn_layer_gpu.md" ] && cp "$WORK/gn_layer_gpu.md" "$OUT/"
    for f in "$WORK"/hippo_*.ckpt "$WORK"/hippo_*_metrics.csv; do
        [ -f "$f" ] && cp "$f" "$OUT/"
    done
fi
exit 0
