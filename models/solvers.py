"""Samplers of the three families with their official schedules: flow-matching UniPC (Wan2.1), flow Euler
(HunyuanVideo) and rectified-flow Euler (OpenSora 1.2).

Path and prediction. All three are trained on the straight path x_σ = (1 − σ)·x0 + σ·noise, σ ∈ [0, 1], and
sample from σ ≈ 1 down to σ = 0. Wan and HunyuanVideo predict v = dx/dσ = noise − x0; OpenSora predicts the
opposite sign, v = x0 − noise.

Interface shared by the sampling loops:
    solver.timesteps              [N]  what the model gets at step i (int64 for Wan, float for the others)
    solver.step(v, i, x) -> x'    one step from σ_i to σ_{i+1}; v may be any float dtype, x' is fp32 (the
                                  official loops keep the latents in fp32 and upcast the velocity)
Solvers carry per-run state (UniPC keeps its last model outputs and checks that steps come in order 0..N−1):
build one instance per generation.

Legend: N sampling steps; x, v: latents of any shape (e.g. [B, C, F, H, W]).
"""

from __future__ import annotations

import torch
from torch import Tensor

#####  Schedules  #####


def _check_steps_shift(num_steps: int, shift: float) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 = no shift; Wan uses 5, HunyuanVideo 7), got {shift!r}")


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 time shift σ' = s·σ / (1 + (s − 1)·σ): s > 1 spends more of the steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def wan_sigmas(num_steps: int, shift: float = 5.0, sigma_max: float = 0.999) -> Tensor:
    """Official Wan2.1 schedule (FlowUniPCMultistepScheduler.set_timesteps), [N+1] float64 ending in 0.

    Kept in float64 as the official computes it (numpy), because the model's int timesteps are truncated from
    these values; FlowUniPC rounds them to float32 for the update, as the official does.
    """
    _check_steps_shift(num_steps, shift)
    if not 0 < sigma_max < 1:
        raise ValueError(f"sigma_max must be in (0, 1) (UniPC needs log(1 − σ)), got {sigma_max!r}")
    # The official reads σ_max back from its float32 training table: 0.999 → 0.99900001287...
    sigma_max = torch.tensor(sigma_max, dtype=torch.float32).item()
    # numpy's linspace(σ_max, 0, N+1)[:-1], written out: σ_i = i·(0 − σ_max)/N + σ_max (bit-identical)
    i = torch.arange(num_steps, dtype=torch.float64)  # [N]
    sigmas = shift_sigmas(i * (-sigma_max / num_steps) + sigma_max, shift)  # [N]
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # [N+1]  final σ = 0: the last step lands on x0


def hunyuan_sigmas(num_steps: int, shift: float = 7.0) -> Tensor:
    """Official HunyuanVideo schedule (FlowMatchDiscreteScheduler, reverse=True): [N+1] float32, 1 → 0."""
    _check_steps_shift(num_steps, shift)
    return shift_sigmas(torch.linspace(1, 0, num_steps + 1), shift)  # [N+1], float32 like the official


def opensora_timesteps(
    num_steps: int, *, height: int, width: int, num_frames: int, num_timesteps: int = 1000
) -> tuple[Tensor, Tensor]:
    """Official OpenSora 1.2 RFLOW timesteps with `use_timestep_transform`, and the dt's its loop uses.

    Returns (timesteps [N] float32 in (0, num_timesteps], dts [N] float32 > 0, summing to t_0/num_timesteps).
    """
    _check_steps_shift(num_steps, 1.0)
    if min(height, width) < 1 or num_frames < 1:
        raise ValueError(f"height, width and num_frames must be >= 1, got {height}, {width}, {num_frames}")
    if 1 < num_frames < 17:
        raise ValueError(
            f"num_frames={num_frames}: OpenSora's transform needs 1 or >= 17 frames "
            "(num_frames // 17 * 5 = 0 would collapse every timestep to 0)"
        )
    t = torch.tensor([(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)])  # [N] float32
    t = t / num_timesteps  # [N] in (0, 1]
    # The official passes height, width and num_frames as bf16 tensors (the model dtype), so the whole ratio
    # is computed in bf16: e.g. 240·426 = 102240 rounds to 102400, sqrt(15) to 3.875.
    h, w, f = (torch.tensor([v], dtype=torch.bfloat16) for v in (height, width, num_frames))
    ratio_space = (h * w / (512 * 512)).sqrt()  # resolution relative to 512²
    # latent frames: the temporal VAE turns each 17 frames into 5 (an image stays 1)
    latent_frames = torch.ones_like(f) if num_frames == 1 else f // 17 * 5
    ratio = ratio_space * latent_frames.sqrt()  # [1] bf16; base of 1 latent frame
    # Same shift as SD3 with s = ratio; the float32 t promotes the product (ratio − 1 itself stays bf16)
    timesteps = ratio * t / (1 + (ratio - 1) * t) * num_timesteps  # [N] float32
    # Euler step sizes from the unrounded float32 timesteps; the last step integrates all the way to t = 0
    dts = torch.cat([timesteps[:-1] - timesteps[1:], timesteps[-1:]]) / num_timesteps  # [N]
    return timesteps, dts


#####  Solvers  #####


def _check_sigmas(sigmas: Tensor) -> Tensor:
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor [N+1] (N steps plus the final σ), e.g. wan_sigmas(50)")
    if not torch.isfinite(sigmas).all() or not (sigmas[1:] < sigmas[:-1]).all() or sigmas[-1] < 0:
        raise ValueError(f"sigmas must be finite, >= 0 and strictly decreasing, got {sigmas.tolist()}")
    return sigmas


def _check_step(model_output: Tensor, i: int, sample: Tensor, num_steps: int) -> None:
    if not 0 <= i < num_steps:
        raise ValueError(f"step index {i} is outside 0..{num_steps - 1}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model output {tuple(model_output.shape)} != sample {tuple(sample.shape)}")
    if not (model_output.is_floating_point() and sample.is_floating_point()):
        raise ValueError(f"model output and sample must be float, got {model_output.dtype}, {sample.dtype}")


class FlowEuler:
    """First-order flow sampler (HunyuanVideo): x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i with v = noise − x0."""

    def __init__(self, sigmas: Tensor, num_train_timesteps: int = 1000):
        self.sigmas = _check_sigmas(sigmas).float()  # [N+1]  the official steps with float32 σ's
        self.timesteps = self.sigmas[:-1] * num_train_timesteps  # [N]  HunyuanVideo feeds t = 1000σ (float)

    def step(self, model_output: Tensor, i: int, sample: Tensor) -> Tensor:
        _check_step(model_output, i, sample, len(self.timesteps))
        dt = self.sigmas[i + 1] - self.sigmas[i]  # < 0: σ falls toward 0
        return sample.float() + model_output.float() * dt


class RFEuler:
    """OpenSora 1.2 rectified-flow Euler: x_{i+1} = x_i + dt_i·v_i with v = x0 − noise and dt_i > 0.

    The sign is the opposite of FlowEuler because OpenSora predicts x0 − noise; build it with
    `RFEuler(*opensora_timesteps(...))`.
    """

    def __init__(self, timesteps: Tensor, dts: Tensor):
        if timesteps.ndim != 1 or timesteps.shape != dts.shape or not (dts > 0).all():
            raise ValueError(
                "timesteps and dts must be 1-D of equal length with dts > 0 (see opensora_timesteps)"
            )
        self.timesteps = timesteps  # [N] float, t ∈ (0, 1000]; the model rounds it to bf16 itself
        self.dts = dts.float()  # [N]

    def step(self, model_output: Tensor, i: int, sample: Tensor) -> Tensor:
        _check_step(model_output, i, sample, len(self.timesteps))
        return sample.float() + model_output.float() * self.dts[i]


class FlowUniPC:
    """Multistep UniPC (Zhao et al. 2023, arXiv 2302.04867) in flow-matching form, as Wan2.1 samples.

    Each step first corrects x_i with the new model output (UniC), then predicts x_{i+1} from the last
    `order` outputs (UniP). With predict_x0 the outputs are data predictions x0 = x − σ·v, and the update is
    an exponential integrator in λ = log(α/σ) (half log-SNR) with α = 1 − σ. Timesteps are int64, ⌊1000σ⌋
    like the official. Arithmetic mirrors the official FlowUniPCMultistepScheduler (float32 σ's and
    0-d coefficient tensors).
    """

    def __init__(
        self,
        sigmas: Tensor,
        order: int = 2,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        num_train_timesteps: int = 1000,
    ):
        _check_sigmas(sigmas)
        if sigmas[0] >= 1:
            raise ValueError(
                f"FlowUniPC needs σ_0 < 1 (λ = log((1−σ)/σ) is −∞ at σ = 1), got σ_0 = {sigmas[0].item()}; "
                "wan_sigmas() starts at 0.999"
            )
        if order < 1 or solver_type not in ("bh1", "bh2"):
            raise ValueError(
                f"order must be >= 1 and solver_type 'bh1' or 'bh2', got {order}, {solver_type!r}"
            )
        if sigmas[-1] == 0 and (not predict_x0 or (order > 1 and not lower_order_final)):
            # Into σ = 0, λ = ∞: only a first-order step on x0 predictions is finite (it returns x0 itself)
            raise ValueError("a final σ of 0 needs predict_x0=True and lower_order_final=True (or order=1)")
        # [N] int64, truncated like the official; from float64 σ's (wan_sigmas) to get the official integers
        self.timesteps = (sigmas[:-1] * num_train_timesteps).to(torch.int64)
        self.sigmas = sigmas.float()  # [N+1]  the official update uses float32 σ's
        self.order, self.predict_x0, self.solver_type = order, predict_x0, solver_type
        self.lower_order_final = lower_order_final
        # Per-run state
        self.model_outputs: list[Tensor] = []  # converted outputs m_i, m_{i−1}, ... (newest first, <= order)
        self.last_sample: Tensor | None = None  # x_i the last predictor started from (the corrector's base)
        self.this_order = 0  # order the last predictor used (the corrector reuses it)
        self.next_step = 0

    def _lambda(self, j: int) -> Tensor:
        """λ_j = log α_j − log σ_j, α = 1 − σ; +∞ at σ = 0."""
        return torch.log(1 - self.sigmas[j]) - torch.log(self.sigmas[j])

    def _bh_update(self, x: Tensor, s: int, t: int, order: int, model_t: Tensor | None = None) -> Tensor:
        """UniP (model_t None) or UniC (model_t = converted output at σ_t) of `order`, from x at σ_s to σ_t.

        Uses self.model_outputs = [m_s, m_{s−1}, ...]. UniC folds the new output in as one more difference
        with r = 1, which is why the order conditions carry a trailing r = 1.
        """
        lam_s, m0 = self._lambda(s), self.model_outputs[0]
        h = self._lambda(t) - lam_s  # step length in λ
        rks, diffs = [], []
        for k in range(1, order):  # divided differences of older outputs, r_k = (λ_{s−k} − λ_s)/h < 0
            rk = (self._lambda(s - k) - lam_s) / h
            rks.append(rk)
            diffs.append((self.model_outputs[k] - m0) / rk)
        rks = torch.tensor([*rks, 1.0])  # [order]
        hh = -h if self.predict_x0 else h  # data prediction integrates e^{−h}, noise prediction e^{h}
        h_phi_1 = torch.expm1(hh)  # h·φ_1(hh) = e^{hh} − 1
        b_h = hh if self.solver_type == "bh1" else torch.expm1(hh)  # the paper's B(h): hh or e^{hh} − 1
        # Order conditions R·ρ = b with R_{k,j} = r_j^k and b_k = hh·φ_{k+1}(hh)·k!/B(h), k = 0..order−1,
        # using φ_{k+1}(x) = (φ_k(x) − 1/k!)/x
        rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            rows.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(rows), torch.tensor(b)  # [order, order], [order]
        if model_t is None:  # UniP: ρ from the known differences only (order 2: the paper's fixed ρ = 1/2)
            rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:  # UniC: one more difference, the new output against m_s (order 1: ρ = 1/2)
            diffs.append(model_t - m0)
            rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        alpha_t, sigma_t = 1 - self.sigmas[t], self.sigmas[t]
        if self.predict_x0:  # x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·m0 − α_t·B(h)·Σ ρ_k D_k
            x_t = sigma_t / self.sigmas[s] * x - alpha_t * h_phi_1 * m0
            scale = alpha_t * b_h
        else:  # x_t = (α_t/α_s)·x − σ_t(e^{h} − 1)·m0 − σ_t·B(h)·Σ ρ_k D_k
            x_t = alpha_t / (1 - self.sigmas[s]) * x - sigma_t * h_phi_1 * m0
            scale = sigma_t * b_h
        if diffs:
            x_t = x_t - scale * sum(rho * d for rho, d in zip(rhos, diffs))
        return x_t

    def step(self, model_output: Tensor, i: int, sample: Tensor) -> Tensor:
        _check_step(model_output, i, sample, len(self.timesteps))
        if i != self.next_step:
            raise ValueError(f"FlowUniPC expects step {self.next_step} next, got {i}: use one solver per run")
        x, sigma = sample.float(), self.sigmas[i]
        v = model_output.float()  # upcast first (the official Wan model already returns fp32)
        # x0 = x − σ·v from x = (1−σ)·x0 + σ·noise and v = noise − x0; noise = x + (1−σ)·v likewise
        m = x - sigma * v if self.predict_x0 else x + (1 - sigma) * v
        if i > 0:  # UniC: x_i came from the predictor at step i−1; correct it with m_i = f(x_i)
            x = self._bh_update(self.last_sample, i - 1, i, self.this_order, model_t=m)
        self.model_outputs = [m, *self.model_outputs][: self.order]
        # Warm-up (only i+1 outputs exist) and lower order at the end: the step into σ = 0 is first order
        order = min(self.order, len(self.timesteps) - i) if self.lower_order_final else self.order
        self.this_order = min(order, i + 1)
        self.last_sample, self.next_step = x, i + 1
        return self._bh_update(x, i, i + 1, self.this_order)
