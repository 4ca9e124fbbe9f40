"""The transformation vector of a skipped step, forecast from the Δ of the last computed steps (issue 25).

EasyCache reuses Δ_i = v_i − x_i of the last computed step i as it is (a zero-order hold). A forecast
extrapolates it instead, to first order in the step index, as TaylorSeer does for features but on the whole
model's Δ:
    "linear"  Δ̂_t = Δ_i + w (Δ_i − Δ_j),    w = (t − i) / (i − j)      (j: the computed step before i)
    "fitted"  Δ̂_t = Δ_i + c w (Δ_i − Δ_j),  c ∈ [0, 1] measured at run time: the least-squares gain of the
              linear forecast that step i could have been given from h < j < i, c = ⟨a, b⟩ / ⟨b, b⟩ with
              a = Δ_i − Δ_j (what happened) and b = (i − j)/(j − h) (Δ_j − Δ_h) (what "linear" predicted);
              c = 0 falls back to the zero-order hold where the trajectory bends, c = 1 is "linear".
"""

from __future__ import annotations

from torch import Tensor

FORECASTS = ("none", "linear", "fitted")


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
            w = self.gain * w
        return {name: d + w * (d - dj[name]) for name, d in di.items()}
