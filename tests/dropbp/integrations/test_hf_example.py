"""examples/hf_sft_dropbp.py runs offline on a tiny random LLaMA and reports a falling loss."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("extra", [[], ["--sft"]])
def test_the_hf_example_runs_offline_and_learns(tmp_path, extra):
    pytest.importorskip("peft")
    if extra:
        pytest.importorskip("trl")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_sft_dropbp.py"), "--max_steps", "10",
                             "--out_dir", str(tmp_path), *extra],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny model: one thread is fastest
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert last < first
    assert "calibrated at steps [1]" in result.stdout
    assert (tmp_path / "checkpoint-5" / "dropbp_state.pt").is_file()
