"""The transformation vector of a skipped step, forecast from the Δ of the last computed steps (issue 25).

EasyCache reuses Δ_i = v_i − x_i of the last computed step i as it is (a zero-order hold). A forecast
extrapolates it instead, to first order in the step index, as TaylorSeer does for features but on the whole
model's Δ:
    "linear"  Δ̂_t = Δ_i + w (Δ_i − Δ_j),    w = (t − i) / (i − j)      (j: the computed step before i)
    "fitted"  Δ̂_t = Δ_i + c min(w, 1) (Δ_i − Δ_j), with two guards measured or known at run time:
              - never more than one gap i − j ahead (the secant is the slope over [j, i]; right after the
                warm-up i − j = 1 while the first run of skips can be long);
              - a gain c ∈ [0, 1], the least-squares fit of how well the linear forecast would have done at
                step i from h < j < i: c = ⟨a, b⟩ / ⟨b, b⟩, a = Δ_i − Δ_j (what happened), b = (i − j)/(j − h)
                (Δ_j − Δ_h) (what "linear" predicted); c = 0 holds Δ_i where the trajectory bends.
"""

from __future__ import annotations

from torch import Tensor

from .configs import FORECASTS


class DeltaForecast:
    """Keeps the Δ of the last three computed steps; one per generation."""

    def __init__(self, mode: str):
        if mode not in FORECASTS[1:]:
            raise ValueError(f"forecast must be one of {FORECASTS[1:]}, got {mode!r}")
        self.mode = mode
        self.history: list[tuple[int, dict[str, Tensor]]] = []  # [(step, {branch: Δ})], oldest first
        self.gain: Tensor | None = None  # c of "fitted" (0-dim, on the device: no host sync)

    def push(self, step: int, delta: dict[str, Tensor], branch: str) -> None:
        """Record the Δ of computed step `step`; `branch` is the one whose Δ fits the gain."""
        self.history = [*self.history[-2:], (step, delta)]
        if self.mode == "fitted" and len(self.history) == 3:
            (h, dh), (j, dj), (i, di) = self.history
            a = (di[branch] - dj[branch]).float()
            b = (dj[branch] - dh[branch]).float() * ((i - j) / (j - h))
            self.gain = ((a * b).sum() / (b * b).sum()).nan_to_num(0.0).clamp(0.0, 1.0)

    def at(self, step: int) -> dict[str, Tensor]:
        """Δ̂ at skipped step `step` for every branch (the last Δ as it is until there is enough history)."""
        i, di = self.history[-1]
        if len(self.history) < 2 or (self.mode == "fitted" and self.gain is None):
            return di
        j, dj = self.history[-2]
        w = (step - i) / (i - j)
        if self.mode == "fitted":
            # the secant Δ_i − Δ_j is the slope over [j, i]: trust it at most one such gap ahead
            w = self.gain * min(w, 1.0)
        return {name: d + w * (d - dj[name]) for name, d in di.items()}
