"""benchmarks/gpu_check.py, the one command for a lent GPU, runs end to end at smoke scale on CPU."""
import importlib.util
import os

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs whole scripts or processes


def test_gpu_check_runs_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in gpu_check.self_contained():  # a throughput row per registered target that needs no file
        assert any(line.startswith(name) and "s/epoch" in line and "GFLOP/step" in line
                   for line in out.splitlines()), name
    assert "train pixel: ok" in out and "train ema: ok" in out
