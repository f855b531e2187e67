#!/usr/bin/env bash
# Side-by-side benchmark of sqla_pgotask against rawsql / pgqueuer / procrastinate,
# with the shared harness (shared/bench).  Idempotent: the harness is (re)copied
# into $BENCH_DIR, whose venv is made once and reused.
#
#   benchmarks/run_side_by_side.sh                      # rawsql,pgqueuer,procrastinate,sqla_pgotask; w1-w4, 3 reps
#   benchmarks/run_side_by_side.sh --workloads w1,w3 --w1-n 500 --w3-n 2000 --reps 1
#   ADAPTERS=rawsql,pgqueuer benchmarks/run_side_by_side.sh --workloads w5 --reps 1   # W5: text and ORM handlers
#   benchmarks/run_side_by_side.sh --report "$PWD/benchmarks/results/latest.md"
#
# Every argument goes to `python -m bench.run`.  If no --adapters is given,
# $ADAPTERS (registry names, comma-separated) plus our adapter are used.
# Environment: HARNESS_SRC (default: <repo>/../shared/bench), BENCH_DIR (default
# ${TMPDIR:-/tmp}/sqla_pgotask-bench), BENCH_PG (server URL, the harness's own),
# PYTHON (interpreter for the venv, default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS_SRC="${HARNESS_SRC:-$REPO/../shared/bench}"
[ -d "$HARNESS_SRC/bench" ] || HARNESS_SRC=/work/shared/bench
BENCH_DIR="${BENCH_DIR:-${TMPDIR:-/tmp}/sqla_pgotask-bench}"
PYTHON="${PYTHON:-python3}"
OURS="$REPO/benchmarks/sqla_pgotask_adapter.py:SqlaPgotaskAdapter"
# With W5, both handler styles: session.execute(text(...)) and the ORM's.
case " $* " in
    *w5*) OURS="$OURS,$REPO/benchmarks/sqla_pgotask_adapter.py:SqlaPgotaskOrmAdapter" ;;
esac
ADAPTERS="${ADAPTERS:-rawsql,pgqueuer,procrastinate}"

if [ ! -d "$HARNESS_SRC/bench" ]; then
    echo "harness not found at $HARNESS_SRC (set HARNESS_SRC)" >&2
    exit 2
fi

# 1. a writable copy of the harness (refreshed every time; results/ and .venv kept)
mkdir -p "$BENCH_DIR"
rm -rf "$BENCH_DIR/bench"
cp -r "$HARNESS_SRC/bench" "$HARNESS_SRC/requirements.txt" "$BENCH_DIR/"
chmod -R u+w "$BENCH_DIR/bench" "$BENCH_DIR/requirements.txt"
mkdir -p "$BENCH_DIR/results"

# 2. its venv, made once; reinstalled only when the requirements change
VENV="$BENCH_DIR/.venv"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.sqla_pgotask-bench-stamp"
WANT="$(cat "$BENCH_DIR/requirements.txt" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    "$VENV/bin/pip" install -q -r "$BENCH_DIR/requirements.txt"
    # our library, editable: the benchmark always runs the working tree
    "$VENV/bin/pip" install -q -e "$REPO"
    "$VENV/bin/python" -c "import sqla_pgotask, procrastinate, pgqueuer" # fail early
    echo "$WANT" > "$STAMP"
fi

# 3. the suite
cd "$BENCH_DIR"
have_adapters=0
for a in "$@"; do
    case "$a" in --adapters|--adapters=*) have_adapters=1 ;; esac
done
if [ "$have_adapters" = 1 ]; then
    exec "$VENV/bin/python" -m bench.run "$@"
else
    exec "$VENV/bin/python" -m bench.run --adapters "$ADAPTERS,$OURS" "$@"
fi
