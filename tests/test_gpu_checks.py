"""benchmarks/gpu_checks.py: its framework sections run (on CPU, GradScaler forced) and pass.

On a GPU machine run ``python benchmarks/gpu_checks.py`` itself: the same
comparisons with the GradScaler and autocast the frameworks make on CUDA.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.py"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_section_passes_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("samkit_gpu_checks", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "checks.json"
    code = module.main(["--device", "cpu", "--json", str(out)])
    results = json.loads(out.read_text())
    assert code == 0, results
    assert results["lightning_16_mixed"]["overflow"]["changed_from_init"] == 0.0
    assert results["huggingface_fp16"]["overflow"]["scheduler_steps"] == 0
    # the core sections that mean something on CPU ran and passed
    for name in ("core_foreach", "core_fp16_scaler", "core_bf16", "core_mixes_scaler"):
        assert results[name]["ok"] and "skipped" not in results[name], name
    assert results["core_no_host_sync"]["skipped"]
