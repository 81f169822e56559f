#!/usr/bin/env bash
# Run the benchmarks and grids on a GPU host without internet, within a time budget, from the repo root:
#
#   bash bench/device/session.sh [--budget SECONDS] [--out DIR] [--data DIR] [--store DIR] [--wheels DIR]
#                                [--no-wheels] [--device cuda|cpu] [STEP[@SECONDS]...]
#
# --budget SECONDS  wall time for the whole run, setup included (default: none; each step keeps its own cap).
#                   With a budget, 25 s are kept back for packing and a step with under 20 s left is skipped.
# --out DIR         where the results go (default: gpu_results/): session.log, one JSON per benchmark
#                   (train_speed-gpu.json, se_overhead-gpu.json, packing-gpu.json, accuracy_parity-gpu.json,
#                   imagefolder_loader-gpu.json), store.tar.gz (the MLflow db + results/, no model weights)
# --data DIR        the dataset archives (default: offline_data/, filled by fetch_wheels.sh)
# --store DIR       the MLflow store, artifacts and decode cache on the host (default: gpu_store/); a second
#                   run with the same store continues a grid (FINISHED cells are skipped)
# --wheels DIR      the wheelhouse from fetch_wheels.sh (default: .whl/); installed into $SITE (/tmp/site)
# --no-wheels       install nothing: use the packages this machine already has
# --device D        cuda (default) or cpu: cpu rehearses the whole kit on a machine without a GPU (every
#                   step runs with --device cpu, the JSON files are named -cpu.json, GPU-only parts skip
#                   with one line); its figures say nothing about a GPU
#
# STEP:  check          check_env.py --torch and the harness preflight again
#        speed          bench/train_speed.py: plain loop vs harness images/s, MFU     (+ $SPEED_ARGS)
#        se             bench/se_overhead.py: SE-ResNet-50 vs ResNet-50 time          (+ $SE_ARGS)
#        packing        bench/packing.py sweep --workers-per-gpu 1,2,4 (CUDA only)    (+ $PACKING_ARGS)
#        accuracy       bench/accuracy_parity.py: test error of both paths            (+ $ACCURACY_ARGS)
#        bench          speed, se, packing and accuracy in turn, under one cap
#        loaders        bench/imagefolder_loader.py                                   (+ $LOADERS_ARGS)
#        grid:NAME      /usr/bin/time -v run_ablation.py --grid NAME                  (+ $GRID_ARGS);
#                       for NAME=reduction followed by analyze:reduction when the grid finished (exit 0)
#        analyze:NAME   run_ablation.py --grid NAME --analyze                         (+ $GRID_ARGS)
# @SECONDS caps that step (default: check 120, speed 180, se 60, packing 120, accuracy 180, bench 420,
# loaders 150, grid 480, analyze 150).
# Before any step: the wheel set's check (check_env.py --torch) and `python -m ablations.run.preflight
# --device D` (one real training step on the device and one write to the store); if the preflight
# fails, no step runs. A step that fails or runs out of time does not stop the next one.
# Every step names --device: a run that cannot use the GPU stops, it never trains on the CPU instead.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
BUDGET=0
OUT_DIR=$ROOT/gpu_results
DATA=$ROOT/offline_data
STORE=$ROOT/gpu_store
WHEELS=$ROOT/.whl
USE_WHEELS=1
DEVICE=cuda
STEPS=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget) BUDGET=${2:-}; shift 2 ;;
    --out) OUT_DIR=${2:-}; shift 2 ;;
    --data) DATA=${2:-}; shift 2 ;;
    --store) STORE=${2:-}; shift 2 ;;
    --wheels) WHEELS=${2:-}; shift 2 ;;
    --no-wheels) USE_WHEELS=0; shift ;;
    --device) DEVICE=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) STEPS+=("$1"); shift ;;
  esac
done
case $BUDGET in ''|*[!0-9]*) echo "error: --budget: expected whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
case $DEVICE in cuda|cpu) ;; *) echo "error: --device: expected cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
TAG=gpu
[ "$DEVICE" = cpu ] && TAG=cpu  # the JSON files say which kind of machine made them
for d in OUT_DIR DATA STORE WHEELS; do
  [ -n "${!d}" ] || { echo "error: an empty path for --out, --data, --store or --wheels" >&2; exit 2; }
  case ${!d} in /*) ;; *) printf -v "$d" '%s/%s' "$ROOT" "${!d}" ;; esac  # absolute: steps run from the repo root
done
mkdir -p "$OUT_DIR" "$STORE" || { echo "error: cannot create $OUT_DIR or $STORE" >&2; exit 2; }
LOG=$OUT_DIR/session.log
SITE=${SITE:-/tmp/site}
T0=$(date +%s)
PACK_RESERVE=25
SUMMARY=()
FAILED=0
LAST_RC=0
CMD=()
# SIGINT (what timeout sends, so that run_ablation marks its cell KILLED) must not be inherited as ignored.
RESET_INT=()
env --default-signal=INT true 2>/dev/null && RESET_INT=(env --default-signal=INT)

now() { date +%s; }
stamp() { printf '[%s +%4ds]' "$(date -u +%H:%M:%S)" $(( $(now) - T0 )); }
say() { echo; echo "$(stamp) ==== $*"; }

install_wheels() {
  local sig
  sig=$(stat -c '%n %s' "$WHEELS"/*.whl "$WHEELS"/fallback/*.whl 2>/dev/null | md5sum | cut -c1-32)
  if [ -f "$SITE/.wheelset" ] && [ "$(cat "$SITE/.wheelset")" = "$sig" ]; then
    echo "wheels already installed in $SITE (same wheel set)"
    return 0
  fi
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "ERROR: no wheels in $WHEELS: run bench/device/fetch_wheels.sh on a machine with internet, copy $WHEELS here"; return 1; }
  rm -rf "$SITE"
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl; then
    # No usable pip: none of these wheels has a .data/ folder, so unzipping them is the same install.
    echo "WARNING: pip install failed; unzipping the wheels into $SITE instead"
    rm -rf "$SITE"
    python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$WHEELS"/*.whl \
      || { echo "ERROR: could not install $WHEELS/*.whl"; return 1; }
  fi
  echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
  # Packages the device has but too old (or too new) for the wheel set: shadow them from $SITE.
  local fb
  fb=$(PYTHONPATH=$SITE python3 bench/device/check_env.py --fallbacks "$WHEELS/fallback")
  if [ -n "$fb" ]; then
    # shellcheck disable=SC2086
    { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $fb \
      || python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" $fb; } \
      && echo "installed fallback wheels: $(echo $fb | xargs -n1 basename | tr '\n' ' ')"
  fi
  echo "$sig" > "$SITE/.wheelset"
}

# run_step LABEL DEFAULT_CAP REQUESTED_CAP CMD...
run_step() {
  local label=$1 default=$2 budget=${3:-$2} left rc start
  shift 3
  case $budget in ''|*[!0-9]*) echo "bad cap '$budget' for $label: using ${default}s"; budget=$default ;; esac
  if [ "$BUDGET" -gt 0 ]; then
    left=$(( T0 + BUDGET - PACK_RESERVE - $(now) ))
    if [ "$left" -lt 20 ]; then
      say "$label: SKIPPED (only ${left}s left of --budget ${BUDGET}s)"
      SUMMARY+=("$(printf '%-22s %6s %5s  %s' "$label" "-" "-" "skipped: out of budget")")
      LAST_RC=skipped
      return 0
    fi
    [ "$budget" -gt "$left" ] && budget=$left
  fi
  say "$label (timeout ${budget}s): $*"
  start=$(now)
  "${RESET_INT[@]}" timeout --signal=INT --kill-after=20 "$budget" "$@"
  rc=$?
  LAST_RC=$rc
  [ $rc -ne 0 ] && FAILED=$(( FAILED + 1 ))
  local wall=$(( $(now) - start )) verdict=ok
  case $rc in
    0) ;;
    124|137) verdict="TIMED OUT after ${budget}s" ;;
    *) verdict="FAILED rc=$rc" ;;
  esac
  say "$label: $verdict (${wall}s)"
  SUMMARY+=("$(printf '%-22s %6ss %5s  %s' "$label" "$wall" "$rc" "$verdict")")
}

pack_store() {  # the MLflow db, results/ and the store's queue journal as one tarball; weights stay on the host
  [ -d "$STORE" ] || return 0
  local items=()
  [ -f "$STORE/mlflow.db" ] && items+=(mlflow.db)
  [ -d "$STORE/results" ] && items+=(results)
  ls "$STORE"/mlflow.db.queue.journal* >/dev/null 2>&1 && items+=($(cd "$STORE" && ls mlflow.db.queue.journal*))
  [ ${#items[@]} -gt 0 ] || return 0
  tar -czf "$OUT_DIR/store.tar.gz" -C "$STORE" "${items[@]}"
  echo "$(stamp) packed $OUT_DIR/store.tar.gz: ${items[*]} ($(du -h "$OUT_DIR/store.tar.gz" | cut -f1);" \
       "model weights left out: $(du -sh "$STORE/mlartifacts" 2>/dev/null | cut -f1))"
}

grid_cmd() {  # grid_cmd NAME [--analyze]: sets CMD (GRID_ARGS is split on spaces)
  CMD=(python3 run_ablation.py --device "$DEVICE" --grid "$1" ${2:-} --data-root "$DATA"
       --tracking-uri "sqlite:///$STORE/mlflow.db" --results-dir "$STORE/results")
  # shellcheck disable=SC2206
  CMD+=(${GRID_ARGS:-})
  if [ -x /usr/bin/time ] && [ -z "${2:-}" ]; then CMD=(/usr/bin/time -v "${CMD[@]}"); fi
}

bench_cmd() {  # bench_cmd speed|se|packing|accuracy: sets CMD to that benchmark (its *_ARGS split on spaces)
  # shellcheck disable=SC2206
  case $1 in
    speed) CMD=(python3 bench/train_speed.py --device "$DEVICE" --data-root "$DATA"
                --json-out "$OUT_DIR/train_speed-$TAG.json" ${SPEED_ARGS:-}) ;;
    se) CMD=(python3 bench/se_overhead.py --device "$DEVICE" --json-out "$OUT_DIR/se_overhead-$TAG.json" ${SE_ARGS:-}) ;;
    packing) CMD=(python3 bench/packing.py sweep --device "$DEVICE" --data-root "$DATA" --workers-per-gpu 1,2,4
                  --json-out "$OUT_DIR/packing-$TAG.json" ${PACKING_ARGS:-}) ;;
    accuracy) CMD=(python3 bench/accuracy_parity.py --device "$DEVICE" --data-root "$DATA"
                   --json-out "$OUT_DIR/accuracy_parity-$TAG.json" ${ACCURACY_ARGS:-}) ;;
  esac
}

bench_all_cmd() {  # sets CMD to one shell running the four benchmarks in turn; exit 1 if any failed
  local script="rc=0" what
  for what in speed se packing accuracy; do
    bench_cmd "$what"
    script+="; echo $(printf '%q' "---- $what: ${CMD[*]}"); $(printf '%q ' "${CMD[@]}") || rc=1"
  done
  CMD=(bash -c "$script; exit \$rc")
}

# The wheel set, then one real training step on the GPU and one write to the store (a command, for `timeout`).
PREFLIGHT=(bash -c 'python3 bench/device/check_env.py --torch --wheels "$1" &&
  python3 -m ablations.run.preflight --device "$3" --tracking-uri "sqlite:///$2/mlflow.db"' preflight "$WHEELS" "$STORE" "$DEVICE")

main() {
  say "$([ "$DEVICE" = cpu ] && echo "CPU rehearsal" || echo "GPU run") on" \
      "$(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null), steps: ${STEPS[*]:-<none: preflight only>};" \
      "budget ${BUDGET}s (0: none); results in $OUT_DIR"
  [ -n "${BENCH_ARGS:-}" ] && echo "WARNING: BENCH_ARGS is not read any more (bench/train_speed.py was split):" \
    "use SPEED_ARGS, SE_ARGS, PACKING_ARGS, ACCURACY_ARGS"
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GIT_PYTHON_REFRESH=quiet
  export SENET_ABLATIONS_CACHE=${SENET_ABLATIONS_CACHE:-$STORE/cache}

  if [ "$USE_WHEELS" = 1 ]; then
    say "setup: wheels $WHEELS -> $SITE"
    install_wheels || FAILED=$(( FAILED + 1 ))
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  else
    say "setup: --no-wheels, the packages installed here"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  fi
  echo "PYTHONPATH=$PYTHONPATH"

  say "machine"
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi || echo "(nvidia-smi failed)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>/dev/null
  else
    echo "nvidia-smi: skipped (--device cpu); load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  fi
  echo "python3: $(command -v python3) $(python3 --version 2>&1); CPUs: $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}')"
  df -h "$ROOT" /tmp 2>/dev/null | sed 1d
  ls -la "$DATA" 2>/dev/null || echo "WARNING: $DATA missing (fetch_wheels.sh fills it; or pass --data DIR)"
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'GPUs', torch.cuda.device_count())"

  run_step preflight 180 "" "${PREFLIGHT[@]}"
  if [ "$LAST_RC" != 0 ]; then
    say "preflight failed: no step runs (the cause is above)"
    STEPS=()
  fi

  local spec step budget name
  for spec in "${STEPS[@]}"; do
    step=${spec%@*}
    budget=""
    [ "$step" != "$spec" ] && budget=${spec##*@}
    case $step in
      check)
        run_step check 120 "$budget" "${PREFLIGHT[@]}" ;;
      speed|se|packing|accuracy)
        bench_cmd "$step"
        run_step "$step" "$(case $step in speed|accuracy) echo 180 ;; se) echo 60 ;; packing) echo 120 ;; esac)" \
          "$budget" "${CMD[@]}" ;;
      bench)
        bench_all_cmd
        run_step bench 420 "$budget" "${CMD[@]}" ;;
      loaders)
        # shellcheck disable=SC2086
        run_step loaders 150 "$budget" python3 bench/imagefolder_loader.py --device "$DEVICE" --data-root "$DATA" \
          --json-out "$OUT_DIR/imagefolder_loader-$TAG.json" ${LOADERS_ARGS:-} ;;
      grid:*)
        name=${step#grid:}
        grid_cmd "$name"
        run_step "$step" 480 "$budget" "${CMD[@]}"
        pack_store
        if [ "$name" = reduction ] && [ "$LAST_RC" = 0 ]; then  # a finished grid only; else analyze:NAME
          grid_cmd "$name" --analyze
          run_step "analyze:$name" 150 "" "${CMD[@]}"
          pack_store
        fi ;;
      analyze:*)
        name=${step#analyze:}
        grid_cmd "$name" --analyze
        run_step "$step" 150 "$budget" "${CMD[@]}"
        pack_store ;;
      *)
        say "unknown step '$spec' (check | speed | se | packing | accuracy | bench | loaders | grid:NAME |" \
            "analyze:NAME, each optionally @SECONDS)"
        SUMMARY+=("$(printf '%-22s %6s %5s  %s' "$spec" "-" "-" "unknown step")") ;;
    esac
  done

  pack_store
  say "summary (wall per step; $(( $(now) - T0 ))s in all, budget ${BUDGET}s)"
  printf '%-22s %7s %5s  %s\n' step wall rc verdict
  printf '%s\n' "${SUMMARY[@]}"
  echo "results in $OUT_DIR:"
  ls -la "$OUT_DIR"
  echo "$(stamp) done: $FAILED step(s) failed or timed out"
  [ "$FAILED" -eq 0 ]
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
