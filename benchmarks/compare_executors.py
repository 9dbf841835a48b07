"""Print the multi-process executor's speed relative to the in-process one, from the CSVs that
`gpu_suite.sh tp1mp` writes (the latest row of each backend): the two must be within 3%.

    python benchmarks/compare_executors.py LATENCY_CSV THROUGHPUT_CSV
"""

from __future__ import annotations

import csv
import sys

TOLERANCE = 0.03
METRICS = {"decode_tok_per_s": "batch-1 decode tok/s", "output_tok_per_s": "throughput output tok/s"}


def latest_by_executor(path: str) -> dict[str, dict]:
    """{executor: its latest row at tensor_parallel_size 1}."""
    with open(path) as f:
        return {row["executor"]: row for row in csv.DictReader(f) if row.get("tp") == "1"}


def main(paths: list[str]) -> int:
    ok = True
    for path in paths:
        rows = latest_by_executor(path)
        metric = next(m for m in METRICS if m in rows["uni"])
        uni, mp = float(rows["uni"][metric]), float(rows["mp"][metric])
        ratio = mp / uni
        within = abs(ratio - 1) <= TOLERANCE
        ok &= within
        print(f"{METRICS[metric]}: uni {uni:,.1f}  mp {mp:,.1f}  mp/uni {ratio:.3f} "
              f"({'within' if within else 'OUTSIDE'} {TOLERANCE:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
