"""benchmarks/fp8_sensitivity.py on the tiny model: every group measured, the choice reported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_measures_each_group_and_convert_linears_choice(tmp_path):
    out = tmp_path / "fp8-sensitivity.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "fp8_sensitivity.py"),
        "--tiny",
        "--latent",
        "8",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    groups = result["groups"]
    assert set(groups) >= {"proj_in", "proj_out", "attn1.to_qkv", "ff.net.0.proj"}
    assert sum(g["flop_share"] for g in groups.values()) == pytest.approx(1, abs=1e-3)
    for group in groups.values():
        assert group["modules"] > 0 and group["rel_err"] > 0  # FP8 did change the output
    chosen = result["convert_linears"]
    # The kept groups (proj_in/out, cross-attention output and K/V) are not in the choice.
    kept = ("proj_in", "proj_out", "attn2.to_out.0", "attn2.to_kv")
    assert chosen["flop_share"] == pytest.approx(
        1 - sum(groups[name]["flop_share"] for name in kept), abs=1e-3
    )
    assert chosen["modules"] == sum(g["modules"] for n, g in groups.items() if n not in kept)
    assert 0 < chosen["rel_err_fp32_unet"] < max(groups[name]["rel_err"] for name in kept) * 2
