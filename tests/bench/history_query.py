#!/usr/bin/env python3
"""The agent page's history query (GET /api/v1/agents/{id}/heartbeats?step=...) over a full
week of 10 s heartbeats for 20 agents, on the real schema, with SQLite from Python's standard
library. Prints rows returned and the mean time per query. See docs/benchmarks.md.

    python3 tests/bench/history_query.py
"""
import random
import sqlite3
import time
from pathlib import Path

root = Path(__file__).resolve().parents[2]
db = sqlite3.connect(":memory:")
for migration in sorted((root / "migrations").glob("*.sql")):
    db.executescript(migration.read_text())
now = 1_763_776_000_000
week = 7 * 86_400_000
rows = [
    (f"{a:016x}", now - week + i * 10_000, i, random.random() * 100, 1.0, 1, 2, 3, 4, 5)
    for a in range(20)
    for i in range(week // 10_000)
]
db.executemany("INSERT INTO heartbeats VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
db.commit()
# The statement SqliteStore::heartbeats runs when given a step.
query = """SELECT b * ? AS at, MAX(seq), MAX(cpu_percent), MAX(load1), MAX(mem_used), MAX(mem_total),
  MAX(disk_used), MAX(disk_total), MAX(process_count)
  FROM (SELECT at / ? AS b, * FROM heartbeats WHERE agent_id = ? AND at >= ?) GROUP BY b ORDER BY b LIMIT ?"""
for name, span, step in [("1h", 3_600_000, 5_000), ("24h", 86_400_000, 120_000), ("7d", week, 900_000)]:
    start = time.perf_counter()
    for _ in range(5):
        got = db.execute(query, (step, step, f"{7:016x}", now - span, 10_000)).fetchall()
    print(f"{name}: {len(got)} points from {span // 10_000} heartbeats, {(time.perf_counter() - start) / 5 * 1000:.1f} ms")
