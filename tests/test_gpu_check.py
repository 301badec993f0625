"""benchmarks/gpu_check.sh, the one-command GPU check, in its dry-run mode (the
CPU-side parts: imports, test collection, bench --help) with this interpreter."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is missing")


def _run(args, tmp_path, **env):
    full = dict(os.environ, PYTHON=sys.executable)
    full.pop("FASTOPT_GPU_CHECK_DRY_RUN", None)
    full.update(env)
    return subprocess.run(["bash", SCRIPT, *args], cwd=str(tmp_path), env=full, capture_output=True, text=True,
                          timeout=300)


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)


def test_dry_run_without_venv(tmp_path):
    results = tmp_path / "out" / "results.txt"
    proc = _run(["--dry-run", "--no-venv", str(results)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (results.read_text() if results.exists() else "")
    assert str(results) in proc.stdout  # says where the results are
    text = results.read_text()
    # the collected tests, including the ones that need a GPU
    assert "tests/test_cuda_backend.py::test_gpu_matches_reference[" in text
    assert "tests/test_cuda_backend.py::test_ptx_compiles_and_assembles[" in text
    assert "usage: python -m fastopt bench" in text and "--device" in text
    assert "fastopt 0.1.0" in text and "cuda.is_available():" in text
    assert "RESULT: PASS" in text


def test_dry_run_from_the_environment_and_default_results_path(tmp_path):
    proc = _run(["--no-venv"], tmp_path, FASTOPT_GPU_CHECK_DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "gpu_check_results.txt").read_text()
    assert "dry run" in text and "test_gpu_matches_reference" in text


def test_bad_option_is_refused(tmp_path):
    proc = _run(["--bogus"], tmp_path)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    assert not (tmp_path / "gpu_check_results.txt").exists()
