"""train_wan_tiny.py: the DiT's learning-rate schedule and the early checks of its command line (the training
itself runs for hours and is never run by the tests)."""

import argparse
import math
import os
import subprocess
import sys

import pytest

from train_wan_tiny import dit_lr, dit_shift, parse_shifts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def schedule(cycles: int, steps: int = 4500, lr: float = 5e-4, decay: float = 0.5) -> list[float]:
    args = argparse.Namespace(dit_steps=steps, dit_cycles=cycles, dit_lr=lr, dit_lr_decay=decay)
    return [dit_lr(s, args) for s in range(steps * cycles)]


def test_first_cycle_is_the_single_cosine_of_the_first_checkpoint():
    # The shipped DiT resumed the 4,500-step single-cycle run: its first cycle must be that schedule exactly.
    one, two = schedule(1), schedule(2)
    single = [5e-4 * min(1.0, (s + 1) / 500) * 0.5 * (1 + math.cos(math.pi * s / 4500)) for s in range(4500)]
    assert two[:4500] == one == pytest.approx(single, rel=1e-12, abs=0)


def test_restart_warms_up_to_a_lower_peak_and_anneals_to_zero():
    lr = schedule(2)
    assert lr[4499] < 1e-9 and lr[-1] < 1e-9  # each cycle ends annealed
    assert lr[4500] == pytest.approx(5e-4 * 0.5 / 500)  # the restart warms up again, from its own step 0
    assert max(lr[4500:]) == pytest.approx(0.5 * max(lr[:4500]), rel=1e-3)  # peak × --dit_lr_decay
    assert min(lr) > 0


def test_one_shift_per_cycle_and_the_last_repeats():
    args = argparse.Namespace(dit_steps=100, dit_shift=parse_shifts("3,3,1.5"))
    assert [dit_shift(s, args) for s in (0, 99, 100, 199, 200, 299, 450)] == [3, 3, 3, 3, 1.5, 1.5, 1.5]
    one = argparse.Namespace(dit_steps=100, dit_shift=parse_shifts("3"))
    assert {dit_shift(s, one) for s in range(300)} == {3.0}  # the default: the shipped checkpoint's σ law


@pytest.mark.parametrize("text", ["3,x", "3,0", "-1", "", "inf", "3,nan"])
def test_bad_shifts_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_shifts(text)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dit_cycles", "0"], "--dit_cycles and --dit_steps must be >= 1"),
        (["--vae_stop", "5000"], "--vae_stop must be in 1..--vae_steps"),
        (["--dit_shift", "3,3,1.5"], "--dit_shift lists 3 shifts for 2 --dit_cycles"),
        (["--dit_shift", "3,zero"], "expected comma-separated numbers"),
    ],
)
def test_bad_schedule_flags_fail_before_any_work(tmp_path, flags, message):
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "train_wan_tiny.py", "--work_dir", str(work), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2 and message in run.stderr
    assert not work.exists()  # nothing written
