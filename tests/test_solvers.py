"""Samplers against the official schedulers (recorded golden values) and the diffusers ones (run live).

tests/data/solvers_golden.safetensors was recorded once, in a scratch directory outside the repository, by
running the official code on the toy velocity field `toy_velocity` below, with noise, w and b drawn in that
order by `torch.randn((1, 2, 3, 4, 4), generator=torch.Generator().manual_seed(1234))` (torch 2.13 CPU, fp32):
  - wan_*: Wan2.1 @9737cba wan/utils/fm_solvers_unipc.py, built as text2video.py does
    (`FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)`,
    `set_timesteps(50, shift=5.0)`); 50 `step()` calls, the field evaluated at `sigmas[i]`.
  - hunyuan_*: HunyuanVideo @fa14b00 hyvideo/diffusion/schedulers/scheduling_flow_match_discrete.py,
    `FlowMatchDiscreteScheduler(shift=7.0, reverse=True, solver="euler")`, `set_timesteps(50)`.
  - opensora_{H}x{W}x{F}_*: Open-Sora branch opensora/v1.2 @bde3c42, `RFLOW(num_sampling_steps=30,
    cfg_scale=7.0, use_timestep_transform=True).sample(...)` with bf16 height/width/num_frames/fps (as
    scripts/inference.py passes them), bf16 starting noise, and a fake model returning the bf16 toy field for
    both CFG halves (so the guided velocity equals it); the dts follow the loop's `dt` formula.
Each *_traj holds the sample before the first step and after every step.
"""

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.solvers import (
    FlowEuler,
    FlowUniPC,
    RFEuler,
    hunyuan_sigmas,
    opensora_timesteps,
    wan_sigmas,
)

GOLDEN = load_file(os.path.join(os.path.dirname(__file__), "data", "solvers_golden.safetensors"))

# Official Wan2.1 T2V timesteps, 50 steps, shift 5 (FlowUniPCMultistepScheduler.set_timesteps)
WAN_TIMESTEPS_50_SHIFT_5 = [
    999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
    882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
    555, 522, 487, 448, 405, 356, 302, 241, 172, 92,
]  # fmt: skip


def toy_velocity(x, sigma, w, b):
    """A smooth nonlinear field that also changes with σ, so UniPC's history and corrector matter."""
    return torch.tanh(x) * w + math.cos(3.0 * sigma) * b


def run(solver, x, sigma_of_step, dtype=torch.float32):
    """Sample with the toy field; returns the trajectory [N+1, *x.shape] (fp32)."""
    traj = [x.float()]
    for i in range(len(solver.timesteps)):
        v = toy_velocity(x, sigma_of_step(i), GOLDEN["w"], GOLDEN["b"]).to(dtype)
        x = solver.step(v, i, x)
        traj.append(x)
    return torch.stack(traj)


#####  Wan2.1: schedule and FlowUniPC  #####


def test_wan_schedule_matches_official():
    sigmas = wan_sigmas(50, shift=5.0)
    solver = FlowUniPC(sigmas)
    assert solver.timesteps.dtype == torch.int64
    assert solver.timesteps.tolist() == WAN_TIMESTEPS_50_SHIFT_5
    assert torch.equal(solver.timesteps, GOLDEN["wan_timesteps"])
    assert torch.equal(solver.sigmas, GOLDEN["wan_sigmas"])  # float32 σ's, bit-identical, final 0
    assert sigmas[-1] == 0 and len(sigmas) == 51


def test_wan_unipc_trajectory_matches_official():
    solver = FlowUniPC(wan_sigmas(50, shift=5.0))
    traj = run(solver, GOLDEN["noise"], lambda i: solver.sigmas[i].item())
    torch.testing.assert_close(traj, GOLDEN["wan_unipc_traj"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("order,solver_type", [(2, "bh2"), (3, "bh2"), (2, "bh1"), (1, "bh2")])
def test_unipc_matches_diffusers(order, solver_type):
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=order,
        solver_type=solver_type,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
    )
    # diffusers shifts the σ's it is given: hand it the official unshifted ones, linspace(σ_max, 0)[:-1]
    sigma_max = float(np.float32(0.999))
    ref.set_timesteps(sigmas=np.linspace(sigma_max, 0, 51)[:-1])
    solver = FlowUniPC(wan_sigmas(50, shift=5.0), order=order, solver_type=solver_type)
    assert torch.equal(ref.timesteps, solver.timesteps)
    assert torch.equal(ref.sigmas, solver.sigmas)

    x = ref_x = GOLDEN["noise"]
    for i, t in enumerate(solver.timesteps):
        sigma = solver.sigmas[i].item()
        ref_x = ref.step(toy_velocity(ref_x, sigma, GOLDEN["w"], GOLDEN["b"]), t, ref_x).prev_sample
        x = solver.step(toy_velocity(x, sigma, GOLDEN["w"], GOLDEN["b"]), i, x)
        if solver_type == "bh1" and i == 49:
            # bh1 into σ = 0: diffusers (and the official copy) compute B(h)·0 = −∞·0 = NaN; we skip the empty
            # correction term and land on the x0 prediction
            assert torch.isfinite(x).all()
            continue
        torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=0)


def straight_path():
    """x0, noise, and the exact flow velocity noise − x0 of the path x_σ = (1 − σ)·x0 + σ·noise."""
    x0, noise = torch.randn(2, 1, 4, 2, 3, 3)
    return x0, noise, noise - x0


@pytest.mark.parametrize("order", [1, 2, 3])
def test_exact_velocity_reaches_x0(order):
    x0, noise, v = straight_path()
    for solver in (FlowUniPC(wan_sigmas(20, 5.0), order=order), FlowEuler(hunyuan_sigmas(20))):
        x = noise * solver.sigmas[0] + x0 * (1 - solver.sigmas[0])
        for i in range(len(solver.timesteps)):
            x = solver.step(v, i, x)
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_unipc_noise_prediction_lands_on_the_path():
    """predict_x0=False (with a correct ε = x + (1 − σ)·v) is exact on the straight path.

    It must stop above σ = 0, and it starts at σ = 0.9 here: near σ = 1 the x0 part of x is below fp32
    resolution, and the noise-prediction update amplifies that error (the reason Wan uses predict_x0).
    """
    x0, noise, v = straight_path()
    solver = FlowUniPC(torch.linspace(0.9, 0.02, 13, dtype=torch.float64), predict_x0=False)
    x = noise * solver.sigmas[0] + x0 * (1 - solver.sigmas[0])
    for i in range(12):
        x = solver.step(v, i, x)
    torch.testing.assert_close(x, 0.98 * x0 + 0.02 * noise, atol=1e-5, rtol=0)


def test_unipc_takes_any_float_velocity_and_keeps_fp32():
    x = GOLDEN["noise"]
    v = toy_velocity(x, 0.5, GOLDEN["w"], GOLDEN["b"]).to(torch.bfloat16)
    a, b = FlowUniPC(wan_sigmas(4)), FlowUniPC(wan_sigmas(4))
    out = a.step(v, 0, x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert torch.equal(out, b.step(v.float(), 0, x.to(torch.bfloat16).float()))  # v upcast before any math


#####  HunyuanVideo: flow Euler  #####


def test_hunyuan_schedule_and_trajectory_match_official():
    solver = FlowEuler(hunyuan_sigmas(50, shift=7.0))
    expected_head = [1000.0, 997.093, 994.083, 990.964, 987.730]
    torch.testing.assert_close(solver.timesteps[:5], torch.tensor(expected_head), atol=1e-3, rtol=0)
    assert solver.timesteps[-1].item() == 125.0 and solver.sigmas[-1] == 0
    # Bit-exact on the CPU kernels of the golden run; torch.linspace's vectorised kernel (FMA) and its scalar
    # one (ATEN_CPU_CAPABILITY=default) differ by one fp32 ulp in 2 of the 51 values (1.3e-7 relative).
    # 3e-7 (~2 ulps) keeps any wrong shift, step count or direction far outside (they move values by > 1e-3).
    torch.testing.assert_close(solver.timesteps, GOLDEN["hunyuan_timesteps"], rtol=3e-7, atol=0)
    torch.testing.assert_close(solver.sigmas, GOLDEN["hunyuan_sigmas"], rtol=3e-7, atol=0)
    traj = run(solver, GOLDEN["noise"], lambda i: solver.sigmas[i].item())
    torch.testing.assert_close(traj, GOLDEN["hunyuan_euler_traj"], atol=1e-6, rtol=0)


def test_flow_euler_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
    ref.set_timesteps(sigmas=np.linspace(1, 0, 51)[:-1])
    solver = FlowEuler(hunyuan_sigmas(50, shift=7.0))
    torch.testing.assert_close(ref.timesteps, solver.timesteps, atol=0, rtol=1e-6)  # numpy vs torch linspace
    x = ref_x = GOLDEN["noise"]
    for i, t in enumerate(ref.timesteps):
        sigma = solver.sigmas[i].item()
        ref_x = ref.step(toy_velocity(ref_x, sigma, GOLDEN["w"], GOLDEN["b"]), t, ref_x).prev_sample
        x = solver.step(toy_velocity(x, sigma, GOLDEN["w"], GOLDEN["b"]), i, x)
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=0)


#####  OpenSora 1.2: rectified-flow Euler  #####


@pytest.mark.parametrize(
    "height,width,num_frames,head,last",
    [
        (240, 426, 51, [1000, 985.96, 971.35, 956.13], 77.08),
        (720, 1280, 102, [1000, 996.65, 993.08, 989.28], 261.15),
    ],
)
def test_opensora_timesteps_and_trajectory_match_official(height, width, num_frames, head, last):
    timesteps, dts = opensora_timesteps(30, height=height, width=width, num_frames=num_frames)
    torch.testing.assert_close(timesteps[:4], torch.tensor(head, dtype=torch.float32), atol=5e-3, rtol=0)
    assert abs(timesteps[-1].item() - last) < 5e-3
    key = f"opensora_{height}x{width}x{num_frames}"
    assert torch.equal(timesteps, GOLDEN[f"{key}_timesteps"])
    assert torch.equal(dts, GOLDEN[f"{key}_dts"])  # last step integrates to 0: dt_29 = t_29 / 1000
    solver = RFEuler(timesteps, dts)
    # the official starts from bf16 noise and the model returns bf16; the sample becomes fp32 after step 0
    traj = run(
        solver, GOLDEN["noise"].to(torch.bfloat16), lambda i: timesteps[i].item() / 1000, torch.bfloat16
    )
    torch.testing.assert_close(traj, GOLDEN[f"{key}_rf_traj"], atol=1e-6, rtol=0)


def test_opensora_bf16_resolution_rounding():
    """The official ratio is bf16 (240·426 = 102240 → 102400, sqrt(15) → 3.875); exact math would be off."""
    timesteps, _ = opensora_timesteps(30, height=240, width=426, num_frames=51)
    t, ratio = 29 / 30, math.sqrt(240 * 426 / 512**2) * math.sqrt(51 // 17 * 5)
    unrounded = ratio * t / (1 + (ratio - 1) * t) * 1000  # 985.945
    t, ratio = 29 / 30, 0.625 * 3.875  # the bf16 values
    rounded = ratio * t / (1 + (ratio - 1) * t) * 1000  # 985.962
    assert abs(timesteps[1].item() - rounded) < 1e-3 and abs(timesteps[1].item() - unrounded) > 1e-2


def test_rf_euler_exact_velocity_reaches_x0():
    x0, noise, _ = straight_path()
    solver = RFEuler(*opensora_timesteps(30, height=240, width=426, num_frames=1))
    x = noise  # t_0 = 1000 is pure noise
    for i in range(30):
        x = solver.step(x0 - noise, i, x)  # OpenSora's sign: v = x0 − noise
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


#####  Bad input  #####


@pytest.mark.parametrize("steps", [0, -3])
def test_bad_steps(steps):
    for make in (wan_sigmas, hunyuan_sigmas):
        with pytest.raises(ValueError, match="num_steps"):
            make(steps)
    with pytest.raises(ValueError, match="num_steps"):
        opensora_timesteps(steps, height=240, width=426, num_frames=51)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan")])
def test_bad_shift(shift):
    for make in (wan_sigmas, hunyuan_sigmas):
        with pytest.raises(ValueError, match="shift"):
            make(10, shift)


def test_bad_solver_input():
    with pytest.raises(ValueError, match="σ_0 < 1"):
        FlowUniPC(hunyuan_sigmas(10))  # starts at σ = 1, where λ = −∞
    with pytest.raises(ValueError, match="strictly decreasing"):
        FlowEuler(torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="predict_x0"):
        FlowUniPC(wan_sigmas(10), predict_x0=False)  # noise prediction cannot step into σ = 0
    with pytest.raises(ValueError, match="frames"):
        opensora_timesteps(30, height=240, width=426, num_frames=8)
    solver, x = FlowUniPC(wan_sigmas(10)), torch.zeros(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="expects step 0"):
        solver.step(x, 1, x)  # UniPC keeps history: steps must come in order
    with pytest.raises(ValueError, match="model output"):
        solver.step(x[:, :2], 0, x)
    with pytest.raises(ValueError, match="outside"):
        FlowEuler(hunyuan_sigmas(10)).step(x, 10, x)
