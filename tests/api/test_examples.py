"""Every example runs end to end in its --quick mode and saves its plot."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

# the repository's examples/, two folders up from tests/api/
EXAMPLES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))


@pytest.mark.parametrize("name, expected", [
    ("sine_to_cosine", "test mse"),
    ("digits_rows", "test accuracy"),
    ("bilstm_attention", "test accuracy"),
    ("accelerate_torch_model", "max relative difference"),
])
def test_example_runs(tmp_path, name, expected):
    plot = tmp_path / f"{name}.png"
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--quick", "--plot", str(plot)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, MPLBACKEND="Agg"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout
    assert plot.stat().st_size > 1000, "the plot was not written"
    if name == "digits_rows":
        assert_reduced_precision_keeps_the_accuracy(result.stdout)
    if name == "accelerate_torch_model":  # a frozen copy serving a stream, checked inside
        assert "streamed against whole sequence: max relative difference" in result.stdout


def assert_reduced_precision_keeps_the_accuracy(stdout):
    # docs/guide.md "Reduced precision": a trained classifier's accuracy within 0.5 points
    # of float32's with its LSTM in int8 or under bfloat16 autocast.
    found = dict(re.findall(r"^(int8|bfloat16) test accuracy .* difference ([-+0-9.]+) points",
                            stdout, re.MULTILINE))
    assert set(found) == {"int8", "bfloat16"}, stdout
    for precision, difference in found.items():
        assert abs(float(difference)) <= 0.5, f"{precision}: {difference} points from float32"

