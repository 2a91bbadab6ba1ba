"""CPU per accepted-and-finished job in the store alone: JobStore.create + JobStore.finish (key
row lock, concurrency count, job row, ledger reserve; job update, ledger settle), one thread,
no HTTP or Ray. Prints ms per pair and writes JSON under benchmarks/results/.

    .venv/bin/python benchmarks/store_writes.py                                  # SQLite
    .venv/bin/python benchmarks/store_writes.py --database-url \
        postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp folder")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from service.pricing import Plan, PlanLimits
    from service.store.db import make_engine, make_sessionmaker, migrate
    from service.store.jobs import JobStore
    from service.store.keys import KeyStore

    url = args.database_url or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    engine = make_engine(url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    keys = KeyStore(sessions)
    _, key = keys.create(f"bench-{uuid.uuid4().hex[:8]}", Plan.PAY_PER_USE, balance=Decimal(1000))
    jobs = JobStore(sessions, PlanLimits())  # each job ends before the next: no limit is hit
    # a meta and params of the size real requests carry
    meta = {"prompt": "a lighthouse at dusk, oil painting", **{f"field{i}": i for i in range(25)}}
    params = {"prompt": meta["prompt"], "width": 512, "height": 512, "loras": []}

    def one() -> None:
        job = jobs.create(
            request_id=str(uuid.uuid4()),
            key=key,
            model_id="stable-diffu",
            samples=1,
            params=params,
            meta=meta,
            output_names=["x-0.png"],
            unit_price=Decimal("0.0047"),
        )
        jobs.finish(job.id, generation_time=0.1, meta_updates={"seed": 1, "batch_size": 8})

    for _ in range(50):  # warm caches and the connection pool
        one()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.jobs):
        one()
    cpu_ms = 1000 * (time.process_time() - cpu) / args.jobs
    wall_ms = 1000 * (time.perf_counter() - wall) / args.jobs
    database = "postgresql" if url.startswith("postgres") else "sqlite"
    print(f"{database}: {cpu_ms:.2f} ms CPU, {wall_ms:.2f} ms wall per create + finish")
    out = args.out or ROOT / "benchmarks" / "results" / f"store-writes-{database}.json"
    document = {
        "benchmark": "store_writes",
        "what": "JobStore.create + JobStore.finish, one thread, pay_per_use key",
        "database": database,
        "jobs": args.jobs,
        "cpu_ms_per_job": round(cpu_ms, 3),
        "wall_ms_per_job": round(wall_ms, 3),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
