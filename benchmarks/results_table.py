"""What the kernel benchmarks share at the end of a run: the JSON the docs quote, and its rows as a
Markdown table."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str, env: dict, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """out: {**env, "rows": rows} as JSON; printed: a table with columns (header, row key)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(env, rows=rows), indent=2))
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[key]) for _, key in columns) + " |")
