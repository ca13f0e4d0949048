"""Totals of a reliability run (`make reliability`): faults survived, inputs tried,
requests served, jobs lost, from the JSON lines the tests in tests/reliability wrote.

    .venv/bin/python bench/reliability_totals.py bench/results/reliability.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

SUMMED = ("faults", "inputs", "examples", "requests", "errors", "jobs", "jobs_lost",
          "server_errors")  # fmt: skip


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    totals: Counter[str] = Counter()
    for row in rows:
        for key in SUMMED:
            if isinstance(row.get(key), int):
                totals[key] += row[key]
    print("| check | figures |\n|---|---|")
    for row in rows:
        figures = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("test", "name"))
        print(f"| {row['name']} | {figures} |")
    print("\ntotals: " + ", ".join(f"{k} {totals[k]}" for k in SUMMED if k in totals))
    out = path.with_suffix(".json")
    out.write_text(json.dumps({"checks": rows, "totals": dict(totals)}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/reliability.jsonl"))
