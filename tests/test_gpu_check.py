"""`benchmarks/gpu_check.py --dry-run`: the GPU check's every section runs under Triton's interpreter at tiny
shapes, so the script cannot rot between the sessions that have a GPU. Its correctness checks are real
(kernels vs the fp32 reference, fp16 for the tensor-core path); its timings are only recorded."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the dry run is for Triton's interpreter (on a GPU run the check itself)", allow_module_level=True)


def test_gpu_check_dry_run(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    checks = report["correctness"]
    assert {r["kernel"] for r in checks} == {"mLSTM chunkwise", "mLSTM step", "mLSTM packed", "sLSTM",
                                             "generate compiled"}
    assert {r["dtype"] for r in checks} == {"float16", "float32"} and all(r["pass"] for r in checks)
    timed = {(r["kernel"], r["impl"]) for r in report["kernels"]}
    for kernel in ("mLSTM chunkwise", "mLSTM step", "sLSTM"):
        assert (kernel, "xlstm_hf triton") in timed
    trained = [r for r in report["training"] if "tokens_per_s" in r]
    assert len(trained) == 4 and any(r["model"].startswith("GPT-2") for r in trained), report["training"]
    table = (tmp_path / "gpu_check_dry_run.md").read_text()
    assert "## Correctness" in table and "## Training step" in table
