"""The issue-11 benchmarks keep running: the GPU script's CPU smoke mode and the op-count proxy.

Op counts are deterministic (no timing), so the proxy's target is asserted; timings never are.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_smoke_runs_on_cpu(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    prof = tmp_path / "prof.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--profile", str(prof)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CapaBoost / LoRA r=16: **" in proc.stdout
    assert "CapaBoost d=2 r=16 / LoRA r=32 = **" in proc.stdout
    tables = prof.read_text()
    for method in ("capaboost d=2 r=8", "lora r=16", "lora r=8"):  # one op table per method
        assert f"## {method}:" in tables
    assert tables.count("```") == 6 and tables.count("aten::mm") >= 3


def test_op_count_proxy_capaboost_within_ten_percent_of_lora_r16():
    counts = _load("bench_ops").main([])
    cb, lora16 = counts["capaboost d=2 r=8"], counts["lora r=16"]
    assert counts["lora r=8"]["top-level"] == lora16["top-level"]  # the rank does not change the op count
    assert cb["top-level"] / lora16["top-level"] <= 1.10, (cb, lora16)
    assert cb["kernels"] / lora16["kernels"] <= 1.10, (cb, lora16)
