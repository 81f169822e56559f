#!/usr/bin/env bash
# Prepare the offline-GPU-host kit on a machine that reaches the package registries, from the repo root:
#
#   bash bench/device/fetch_wheels.sh [--python 3.12] [--data DIR]
#
#   .whl/*.whl            the packages a GPU host with torch but without internet usually lacks for
#                         mlflow + optuna + pydantic (CPython --python, manylinux x86_64 or pure Python),
#                         installed there by session.sh with pip --no-index --no-deps --target /tmp/site
#   .whl/fallback/*.whl   newer copies of packages such a host usually HAS (typing-extensions, protobuf,
#                         anyio); session.sh installs one only if the host's own version is outside what
#                         the wheel set requires (check_env.py --fallbacks)
#   DIR (offline_data/)   cifar10-jpeg.tar.gz + imagenette-224-mini.tar.gz from ../shared/data
#
# and makes sure .whl/, offline_data/ and session.sh's gpu_store/ and gpu_results/ are ignored by git.
# Then copy the repository with .whl/ and offline_data/ to the GPU host, by whatever means it offers.
#
# Versions are those installed on the machine that prepared this (Python 3.11 env, 2026-11-26):
# mlflow 3.17.2, optuna 5.0.0, pydantic 2.13.4. The list assumes the host already has torch,
# torchvision and the scientific stack: numpy pandas pyarrow matplotlib scipy pyyaml rich jinja2
# markupsafe click werkzeug requests urllib3 certifi idna charset-normalizer packaging protobuf
# cloudpickle psutil python-dateutil six typing-extensions attrs filelock fsspec tqdm pillow sympy
# networkx zipp pyparsing anyio httpx h11 ... (check_env.py warns about any requirement it misses).
#
# mlflow-skinny instead of mlflow: the skinny wheel holds the same `mlflow` Python package (sqlite
# store, migrations, MlflowClient); the full `mlflow` wheel adds the tracking server's web UI (11.5
# MiB) and requires flask, gunicorn, graphene, docker, huey, skops, aiohttp, ... which only the
# server and model flavors import. mlflow-tracing is left out too (a subset of mlflow-skinny's code).
# What IS needed beyond skinny's obvious deps, found by check_env.py failing without it: fastapi
# (+starlette, annotated-doc: `import mlflow` -> mlflow.gateway), databricks-sdk (`import mlflow`
# probes databricks.agents), cryptography + cffi (the sqlite store imports cryptography.fernet).
set -euo pipefail

PYVER=3.12
DATA_OUT=offline_data
while [ $# -gt 0 ]; do
  case $1 in
    --python) PYVER=${2:-}; shift 2 ;;
    --data) DATA_OUT=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $PYVER in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "error: --python: expected e.g. 3.12, got '$PYVER'" >&2; exit 2 ;; esac
[ -n "$DATA_OUT" ] || { echo "error: --data: empty path" >&2; exit 2; }
ROOT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$ROOT"
SHARED=$(cd "${SHARED_DATA:-../shared/data}" && pwd)

# The closure of mlflow-skinny + optuna + pydantic (hard requirements, markers for CPython 3.12 on
# Linux x86_64) minus what a GPU host with torch usually has.
WHEELS=(
  mlflow-skinny==3.17.2
  optuna==5.0.0
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  sqlalchemy==2.1.9
  alembic==1.20.1
  mako==1.4.3
  colorlog==6.12.0
  cachetools==7.3.3
  sqlparse==0.6.1
  importlib-metadata==9.1.0
  python-dotenv==1.2.2
  gitpython==3.2.1
  gitdb==4.0.12
  smmap==5.0.3
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  fastapi==0.165.0
  starlette==1.10.0
  annotated-doc==0.0.7
  uvicorn==0.54.0
  databricks-sdk==0.162.0
  google-auth==2.63.0
  pyasn1==0.6.3
  pyasn1-modules==0.4.2
  cryptography==48.0.0
  cffi==2.0.0
  pycparser==3.0
)
# Usually present on the host, at a version unknown here; installed there only when too old.
FALLBACK=(
  typing-extensions==4.16.0   # pydantic-core needs >= 4.14.1
  protobuf==7.36.2            # opentelemetry-proto needs >= 5.0
  anyio==4.16.0               # starlette/fastapi need >= 4.0 / 4.1
)

download() {  # download DIR NAME==VERSION
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$1" "$2" 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
}

mkdir -p .whl/fallback "$DATA_OUT"
# Drop wheels that are no longer in the lists (a re-run after a version change).
want=" $(printf '%s ' "${WHEELS[@]}" | tr '[:upper:]_' '[:lower:]-') "
for f in .whl/*.whl; do
  [ -e "$f" ] || continue
  base=$(basename "$f"); name=$(echo "${base%%-[0-9]*}" | tr '[:upper:]_' '[:lower:]-'); ver=$(echo "$base" | cut -d- -f2)
  case "$want" in *" $name==$ver "*) ;; *) echo "removing stale $f"; rm -f "$f" ;; esac
done
for spec in "${WHEELS[@]}"; do download .whl "$spec"; done
for spec in "${FALLBACK[@]}"; do download .whl/fallback "$spec"; done

n=$(ls .whl/*.whl | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "error: ${#WHEELS[@]} packages listed but $n wheels in .whl/" >&2
  exit 1
fi

for f in cifar10-jpeg.tar.gz imagenette-224-mini.tar.gz; do
  if ! cmp -s "$SHARED/$f" "$DATA_OUT/$f"; then cp "$SHARED/$f" "$DATA_OUT/"; fi
done
if [ -f "$SHARED/SHA256SUMS" ]; then
  (cd "$DATA_OUT" && grep -E "cifar10-jpeg.tar.gz|imagenette-224-mini.tar.gz" "$SHARED/SHA256SUMS" | sha256sum -c --quiet -) \
    && echo "data: sha256 ok"
fi

exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for pat in /.whl/ "/${DATA_OUT#/}/" /gpu_store/ /gpu_results/; do
  case $DATA_OUT in /*) [ "$pat" = "/${DATA_OUT#/}/" ] && continue ;; esac  # outside the repository
  grep -qxF "$pat" "$exclude" || echo "$pat" >> "$exclude"
done

mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
echo "wheels: $n in .whl/ ($(mib .whl/*.whl) MiB), $(ls .whl/fallback/*.whl | wc -l) in .whl/fallback/ ($(mib .whl/fallback) MiB)"
echo "data:   $DATA_OUT/ $(mib "$DATA_OUT") MiB"
echo "next:   copy the repository with .whl/ and $DATA_OUT/ to the GPU host; there: bash bench/device/session.sh --help"
