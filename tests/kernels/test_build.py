"""The compiled module, its BLAS wiring and the configuration report."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

import lstmfast
from lstmfast import _core


@pytest.mark.parametrize("dtype, matmul", [(np.float32, _core.matmul_f32), (np.float64, _core.matmul_f64)])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 7), (64, 129, 33), (200, 300, 100)])
def test_blas_matmul_matches_numpy(dtype, matmul, m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    got = matmul(a, b)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = (1e-5 if dtype == np.float32 else 1e-12) * max(1.0, np.abs(expected).max()) * np.sqrt(k)
    err = np.abs(got - expected).max()
    assert err <= tol, f"max |diff| {err:.3g} > {tol:.3g}"


def test_blas_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError, match="inner dimensions"):
        _core.matmul_f32(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        _core.matmul_f32(np.ones(3, np.float32), np.ones((3, 2), np.float32))


def test_blas_is_scipy_openblas():
    assert "OpenBLAS" in _core.blas_config()


def test_set_get_num_threads_round_trip():
    before = lstmfast.get_num_threads()
    try:
        lstmfast.set_num_threads(1)
        assert lstmfast.get_num_threads() == 1
        assert _core.blas_get_num_threads() == 1
    finally:
        lstmfast.set_num_threads(before)
    assert lstmfast.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="n must be >= 1"):
        lstmfast.set_num_threads(bad)


@pytest.mark.parametrize("bad", [1.5, "2", None, True])
def test_set_num_threads_rejects_non_int(bad):
    with pytest.raises(TypeError, match="n must be an int"):
        lstmfast.set_num_threads(bad)


def test_env_variable_sets_default_thread_count():
    code = "import lstmfast; print(lstmfast.get_num_threads())"
    env = dict(os.environ, LSTMFAST_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["LSTMFAST_NUM_THREADS"] = "zero"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "LSTMFAST_NUM_THREADS" in bad.stderr


def test_env_variable_forces_a_simd_target():
    code = "import lstmfast; print(lstmfast._core.simd_target())"
    env = dict(os.environ, LSTMFAST_SIMD_TARGET="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"
    env["LSTMFAST_SIMD_TARGET"] = "avx9000"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "LSTMFAST_SIMD_TARGET: unknown or unsupported SIMD target 'avx9000'" in bad.stderr


def test_show_config_reports_version_simd_blas_threads():
    buf = io.StringIO()
    lstmfast.show_config(file=buf)
    text = buf.getvalue()
    assert text.startswith(f"lstmfast {lstmfast.__version__}")
    for word in ("simd target", "blas", "threads"):
        assert word in text


def test_import_does_not_import_torch():
    code = "import sys, lstmfast, lstmfast.reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_blas_spin_setting_is_scoped_to_our_openblas():
    # lstmfast loads its OpenBLAS with a short worker spin; the environment is left
    # as the user had it, and a value the user set is used as it is.
    code = "import os, lstmfast; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    env["OPENBLAS_THREAD_TIMEOUT"] = "20"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "20"
