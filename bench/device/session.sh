#!/usr/bin/env bash
# One GPU session on the offline device machine, run there from the repo root:
#
#   bash bench/device/session.sh [STEP[@SECONDS]...]
#
# STEP:  check          check_env.py --torch again (always run once as the preflight anyway)
#        bench          bench/train_speed.py --accuracy --workers-per-gpu-sweep 1,2,4  (+ $BENCH_ARGS)
#        loaders        bench/imagefolder_loader.py --device cuda                     (+ $LOADERS_ARGS)
#        grid:NAME      /usr/bin/time -v run_ablation.py --grid NAME                  (+ $GRID_ARGS);
#                       for NAME=reduction followed by the step analyze:reduction when the grid
#                       finished (exit 0); after a timed-out grid, run grid:reduction again next call
#        analyze:NAME   run_ablation.py --grid NAME --analyze                         (+ $GRID_ARGS)
# @SECONDS caps that step (default: check 120, bench 420, loaders 150, grid 480, analyze 150); every
# step is also capped by what is left of $SESSION_BUDGET (default 540 s from the start of this
# script, minus 25 s kept for packing), so the script ends before a run call's timeout_s=600.
# A step that fails or runs out of time does not stop the next one.
#
# Needs (fetch_wheels.sh, carried as carry [".whl", "device_carry"]): .whl/*.whl, .whl/fallback/,
# device_carry/data/{cifar10-jpeg,imagenette-224-mini}.tar.gz.
# Writes into $OUT (at most 8 files come back): session.log (everything printed),
# train_speed-gpu.json, imagefolder_loader-gpu.json, store.tar.gz (device_store/mlflow.db +
# device_store/results/, without the mlartifacts/ weights; re-packed after every grid step).
# device_store/ (MLflow store, artifacts, decode cache) stays on the machine while it is warm, so a
# second call continues a grid: cells already FINISHED are skipped.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
SITE=${SITE:-/tmp/site}
STORE=$ROOT/device_store
DATA=device_carry/data
T0=$(date +%s)
SESSION_BUDGET=${SESSION_BUDGET:-540}
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
  sig=$(stat -c '%n %s' .whl/*.whl .whl/fallback/*.whl 2>/dev/null | md5sum | cut -c1-32)
  if [ -f "$SITE/.wheelset" ] && [ "$(cat "$SITE/.wheelset")" = "$sig" ]; then
    echo "wheels already installed in $SITE (same wheel set)"
    return 0
  fi
  ls .whl/*.whl >/dev/null 2>&1 || { echo "ERROR: no .whl/*.whl: run bench/device/fetch_wheels.sh here and carry .whl"; return 1; }
  rm -rf "$SITE"
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    # No usable pip: none of these wheels has a .data/ folder, so unzipping them is the same install.
    echo "WARNING: pip install failed; unzipping the wheels into $SITE instead"
    rm -rf "$SITE"
    python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" .whl/*.whl \
      || { echo "ERROR: could not install .whl/*.whl"; return 1; }
  fi
  echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE"
  # Packages the device has but too old (or too new) for the wheel set: shadow them from $SITE.
  local fb
  fb=$(PYTHONPATH=$SITE python3 bench/device/check_env.py --fallbacks .whl/fallback)
  if [ -n "$fb" ]; then
    # shellcheck disable=SC2086
    { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $fb \
      || python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" $fb; } \
      && echo "installed fallback wheels: $(echo $fb | xargs -n1 basename | tr '\n' ' ')"
  fi
  echo "$sig" > "$SITE/.wheelset"
}

# run_step LABEL DEFAULT_BUDGET REQUESTED_BUDGET CMD...
run_step() {
  local label=$1 default=$2 budget=${3:-$2} left rc start
  shift 3
  case $budget in ''|*[!0-9]*) echo "bad budget '$budget' for $label: using ${default}s"; budget=$default ;; esac
  left=$(( T0 + SESSION_BUDGET - PACK_RESERVE - $(now) ))
  if [ "$left" -lt 20 ]; then
    say "$label: SKIPPED (only ${left}s left of SESSION_BUDGET=${SESSION_BUDGET}s)"
    SUMMARY+=("$(printf '%-22s %6s %5s  %s' "$label" "-" "-" "skipped: out of session budget")")
    LAST_RC=skipped
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
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

pack_store() {
  [ -d "$STORE" ] || return 0
  local items=() size
  [ -f "$STORE/mlflow.db" ] && items+=(mlflow.db)
  [ -d "$STORE/results" ] && items+=(results)
  ls "$STORE"/optuna-journal.log* >/dev/null 2>&1 && items+=($(cd "$STORE" && ls optuna-journal.log*))
  [ ${#items[@]} -gt 0 ] || return 0
  tar -czf "$OUT/store.tar.gz" -C "$STORE" "${items[@]}"
  size=$(stat -c %s "$OUT/store.tar.gz")
  echo "$(stamp) packed $OUT/store.tar.gz: ${items[*]} ($(awk -v s="$size" 'BEGIN {printf "%.2f", s/1048576}') MiB;" \
       "mlflow.db $(du -h "$STORE/mlflow.db" 2>/dev/null | cut -f1), mlartifacts/ left out: $(du -sh "$STORE/mlartifacts" 2>/dev/null | cut -f1))"
  if [ "$size" -ge $(( 16 * 1048576 )) ]; then
    echo "WARNING: store.tar.gz is over 16 MiB and will not come back; packing results/ alone, the db stays on the machine"
    tar -czf "$OUT/store.tar.gz" -C "$STORE" results
  fi
}

grid_cmd() {  # grid_cmd NAME [--analyze]: sets CMD (GRID_ARGS is split on spaces)
  CMD=(python3 run_ablation.py --grid "$1" ${2:-} --data-root "$DATA" --tracking-uri "sqlite:///$STORE/mlflow.db"
       --results-dir "$STORE/results")
  # shellcheck disable=SC2206
  CMD+=(${GRID_ARGS:-})
  if [ -x /usr/bin/time ] && [ -z "${2:-}" ]; then CMD=(/usr/bin/time -v "${CMD[@]}"); fi
}

main() {
  say "session on $(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null), steps: ${*:-<none: preflight only>}; SESSION_BUDGET=${SESSION_BUDGET}s"
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GIT_PYTHON_REFRESH=quiet
  export SENET_ABLATIONS_CACHE=${SENET_ABLATIONS_CACHE:-$STORE/cache}
  mkdir -p "$STORE"

  say "setup: wheels -> $SITE"
  install_wheels || FAILED=$(( FAILED + 1 ))
  export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  echo "PYTHONPATH=$PYTHONPATH"

  say "machine"
  nvidia-smi || echo "(nvidia-smi failed)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>/dev/null
  echo "python3: $(command -v python3) $(python3 --version 2>&1); CPUs: $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}')"
  df -h "$ROOT" /tmp 2>/dev/null | sed 1d
  ls -la "$DATA" 2>/dev/null || echo "WARNING: $DATA missing: carry device_carry (fetch_wheels.sh)"
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'GPUs', torch.cuda.device_count())"

  run_step preflight 120 "" python3 bench/device/check_env.py --torch

  local spec step budget name
  for spec in "$@"; do
    step=${spec%@*}
    budget=""
    [ "$step" != "$spec" ] && budget=${spec##*@}
    case $step in
      check)
        run_step check 120 "$budget" python3 bench/device/check_env.py --torch ;;
      bench)
        # shellcheck disable=SC2086
        run_step bench 420 "$budget" python3 bench/train_speed.py --data-root "$DATA" --workers-per-gpu-sweep 1,2,4 \
          --accuracy --json-out "$OUT/train_speed-gpu.json" ${BENCH_ARGS:-} ;;
      loaders)
        # shellcheck disable=SC2086
        run_step loaders 150 "$budget" python3 bench/imagefolder_loader.py --device cuda --data-root "$DATA" \
          --json-out "$OUT/imagefolder_loader-gpu.json" ${LOADERS_ARGS:-} ;;
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
        say "unknown step '$spec' (check | bench | loaders | grid:NAME | analyze:NAME, each optionally @SECONDS)"
        SUMMARY+=("$(printf '%-22s %6s %5s  %s' "$spec" "-" "-" "unknown step")") ;;
    esac
  done

  pack_store
  say "summary (wall per step; session $(( $(now) - T0 ))s of SESSION_BUDGET=${SESSION_BUDGET}s)"
  printf '%-22s %7s %5s  %s\n' step wall rc verdict
  printf '%s\n' "${SUMMARY[@]}"
  echo "files in \$OUT:"
  ls -la "$OUT"
  [ "$(ls "$OUT" | wc -l)" -le 8 ] || echo "WARNING: more than 8 files in \$OUT: only 8 come back"
  echo "$(stamp) done: $FAILED step(s) failed or timed out"
  [ "$FAILED" -eq 0 ]
}

main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
