"""benchmarks/gpu_check.py --cpu-smoke: every path of the GPU check (rows, batch search, train, torchrun) on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| impl | model | px | amp | compile |" in done.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    # Eager: ours and timm in bf16 and fp16; compiled (the "eager" backend: tracing without code generation): bf16.
    assert [(r["impl"], r["amp"], r["compile"]) for r in rows] == [
        ("ours", "bf16", False), ("timm", "bf16", False), ("ours", "fp16", False), ("timm", "fp16", False),
        ("ours", "bf16", True), ("timm", "bf16", True)]
    assert all(r["status"] == "ok" and r["train_img_per_s"] > 0 and r["infer_img_per_s"] > 0 for r in rows)
    # The search against simulated limits of 3 and 5 images finds them exactly.
    assert report["largest_batch"] == {"plain": {"largest_batch": 3, "search_cap_reached": False},
                                       "grad_checkpointing": {"largest_batch": 5, "search_cap_reached": False}}
    train, ddp = report["checks"]["train_digits"], report["checks"]["torchrun_ddp"]
    assert train["passed"] and train["train_loss"][1] < train["train_loss"][0]
    assert ddp["passed"] and ddp["backend"] == "gloo"
