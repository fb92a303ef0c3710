"""The seed example on the real default model, through the command line as the README runs it."""

import re
import subprocess
import sys

import pytest

from dapo import DAPOConfig


@pytest.mark.slow
def test_digit_example_learns_to_answer_five(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dapo.cli", "train", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    c = DAPOConfig()
    for line in ("-- Generating rollouts", "-- Training",
                 f"Grad step 1/{c.mu} in train step 1/{c.train_steps} completed. Objective: ",
                 f"Grad step {c.mu}/{c.mu} in train step 2/{c.train_steps} completed."):
        assert line in out
    assert re.search(r"^Reward: \d\.\d{3}; Response: ", out, re.M)
    match = re.search(r'exactly "5" ([\d.]+) before training, ([\d.]+) after', out)
    assert match, out[-2000:]
    before, after = map(float, match.groups())
    assert before < 0.2
    assert after >= 0.8
    # 10 steps, or fewer when dynamic sampling finds every answer correct ("Stopping early ... solves")
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*/model.safetensors"))
    assert checkpoints, "no checkpoint written"
