"""benchmarks/step_overhead.py: a quick run times every scheduler both ways."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_times_each_scheduler_direct_and_through_the_twin(tmp_path):
    out = tmp_path / "step-overhead.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "step_overhead.py"),
        "--batches",
        "1,2",
        "--steps",
        "3",
        "--rounds",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 3
    timings = result["ms_per_step"]
    assert set(timings) == {
        "DDIMScheduler",
        "UniPCMultistepScheduler",
        "DPMSolverMultistepScheduler",
    }
    for per_batch in timings.values():
        assert set(per_batch) == {"1", "2"}
        for modes in per_batch.values():
            assert modes["direct"] > 0 and modes["twin"] > 0
