#!/usr/bin/env bash
# Prepare what a GPU session carries to the offline device machine (run HERE, from the repo root,
# on a machine that reaches the package registries):
#
#   bash bench/device/fetch_wheels.sh
#
#   .whl/*.whl            the packages the device lacks for mlflow + optuna + pydantic (cp312,
#                         manylinux x86_64 or pure Python), installed there by session.sh with
#                         pip --no-index --no-deps --target /tmp/site
#   .whl/fallback/*.whl   newer copies of packages the device HAS (typing-extensions, protobuf,
#                         anyio); session.sh installs one only if the device's own version is
#                         outside what the wheel set requires (check_env.py --fallbacks)
#   device_carry/data/    cifar10-jpeg.tar.gz + imagenette-224-mini.tar.gz from ../shared/data
#
# and makes sure /.whl/, /device_carry/ and /device_store/ are ignored (.git/info/exclude).
# Then: carry [".whl", "device_carry"] (64 MiB in all per call, the working tree included).
#
# Versions are those installed on the machine that prepared this (Python 3.11 env, 2026-11-26):
# mlflow 3.17.2, optuna 5.0.0, pydantic 2.13.4. The device (Python 3.12.3, torch 2.11) already has
# numpy pandas pyarrow matplotlib scipy pyyaml rich jinja2 markupsafe click werkzeug requests urllib3
# certifi idna charset-normalizer packaging protobuf cloudpickle psutil python-dateutil six
# typing-extensions attrs filelock fsspec tqdm pillow sympy networkx zipp pyparsing anyio httpx h11 ...
#
# mlflow-skinny instead of mlflow: the skinny wheel holds the same `mlflow` Python package (sqlite
# store, migrations, MlflowClient); the full `mlflow` wheel adds the tracking server's web UI (11.5
# MiB) and requires flask, gunicorn, graphene, docker, huey, skops, aiohttp, ... which only the
# server and model flavors import. mlflow-tracing is left out too (a subset of mlflow-skinny's code).
# What IS needed beyond skinny's obvious deps, found by check_env.py failing without it: fastapi
# (+starlette, annotated-doc: `import mlflow` -> mlflow.gateway), databricks-sdk (`import mlflow`
# probes databricks.agents), cryptography + cffi (the sqlite store imports cryptography.fernet).
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$ROOT"
SHARED=$(cd "${SHARED_DATA:-../shared/data}" && pwd)

# The closure of mlflow-skinny + optuna + pydantic (hard requirements, markers for CPython 3.12 on
# Linux x86_64) minus what the device already has.
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
# Present on the device, at a version we cannot see from here; installed there only when too old.
FALLBACK=(
  typing-extensions==4.16.0   # pydantic-core needs >= 4.14.1
  protobuf==7.36.2            # opentelemetry-proto needs >= 5.0
  anyio==4.16.0               # starlette/fastapi need >= 4.0 / 4.1
)

download() {  # download DIR NAME==VERSION
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$1" "$2" 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
}

mkdir -p .whl/fallback device_carry/data
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
  if ! cmp -s "$SHARED/$f" "device_carry/data/$f"; then cp "$SHARED/$f" device_carry/data/; fi
done
if [ -f "$SHARED/SHA256SUMS" ]; then
  (cd device_carry/data && grep -E "cifar10-jpeg.tar.gz|imagenette-224-mini.tar.gz" "$SHARED/SHA256SUMS" | sha256sum -c --quiet -) \
    && echo "data: sha256 ok"
fi

exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for pat in /.whl/ /device_carry/ /device_store/; do
  grep -qxF "$pat" "$exclude" || echo "$pat" >> "$exclude"
done
for p in .whl device_carry device_store; do
  git check-ignore -q "$p/x" || echo "warning: $p is not ignored by git" >&2
done

mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
echo "wheels: $n in .whl/ ($(mib .whl/*.whl) MiB), $(ls .whl/fallback/*.whl | wc -l) in .whl/fallback/ ($(mib .whl/fallback) MiB)"
echo "data:   device_carry/ $(mib device_carry) MiB"
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$(awk -v a="$(du -sb .whl | cut -f1)" -v b="$(du -sb device_carry | cut -f1)" -v t="$tree" 'BEGIN {printf "%.1f", (a + b + t) / 1048576}')
echo "carry:  .whl + device_carry + working tree ($(awk -v t="$tree" 'BEGIN {printf "%.1f", t / 1048576}') MiB) = $total MiB of 64 MiB"
awk -v t="$total" 'BEGIN {exit !(t > 64)}' && { echo "error: over the 64 MiB a call carries" >&2; exit 1; }
exit 0
