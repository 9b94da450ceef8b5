#!/usr/bin/env bash
# Install what bench/run.py needs on a fresh Debian machine (run as root). Idempotent.
#   wrk           - the HTTP load generator (Lua-scripted, from Debian's packages)
#   util-linux    - taskset, to pin ResGov / upstream+wrk to separate cores
#   redis-server  - for the Redis store micro-benchmark (bench/store_bench.py)
#   valgrind      - callgrind, for the instruction counts (path_bench.py / run.py --instructions)
#   py-spy        - optional sampling profiler (pip, into the project venv if present)
set -euo pipefail

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)

if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bench/install.sh: need root to apt-get install ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${need[@]}"
    # Debian starts redis-server as a service on :6379 on install; the benchmark runs its
    # own instances on free ports, so that one is left alone.
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="$here/../.venv"
if [[ -x "$venv/bin/python" && ! -x "$venv/bin/py-spy" ]]; then
    "$venv/bin/python" -m pip install --quiet py-spy || echo "bench/install.sh: py-spy not installed (profiling is optional)" >&2
fi

echo "bench: wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}'), $(redis-server --version | awk '{print $3}'), $(valgrind --version), taskset ok"
