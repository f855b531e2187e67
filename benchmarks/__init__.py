"""sqla_pgotask's own benchmark suite: ``python -m benchmarks.run --help``.

Measures the library and a minimal hand-written psycopg queue (``rawsql``) in
the same run, each workload in a fresh database, and prints the ratios.  See
``benchmarks/README.md``.
"""
