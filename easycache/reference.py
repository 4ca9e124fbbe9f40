"""The EasyCache rule in ~25 plain lines, as docs/method.md states it: a reading aid and a test oracle.

`EasyCache` (cache.py) is the same rule behind the three verbs of the sampling loop, with named branches,
one host sync per decision, degenerate statistics and a trace; tests/test_cache.py checks that both take the
same decisions and reach the same latents on random trajectories. Not used by the sample scripts.
"""

from __future__ import annotations


def reference_sampling(x, model, num_steps: int, thresh: float, warmup: int, dt: float = 0.04):
    """Euler sampling x ← x − dt·v with the EasyCache rule; returns ("C"/"S" per step, final x).
    `model(x, t)` is the DiT; ‖·‖ is the mean absolute value over all elements."""
    norm = lambda t: t.abs().mean().item()  # noqa: E731
    prev_x = last_x = last_v = None  # input of the previous step; input and output of the last computed step
    k, acc, pattern = None, 0.0, ""  # transformation rate k_i, accumulated predicted change E_t
    for t in range(num_steps):
        if t < warmup or t == num_steps - 1:  # warm-up R and the last step: always computed
            compute, acc = True, 0.0
        elif k is None:  # k needs two computed steps
            compute = True
        else:
            acc += k * norm(x - prev_x) / norm(last_v)  # E_t += ε_t = k_i ‖x_t − x_{t−1}‖ / ‖v_i‖
            compute = acc >= thresh  # skip while E_t < τ
            if compute:
                acc = 0.0
        prev_x = x
        if compute:
            v = model(x, t)
            if last_v is not None:  # k_i = ‖v_i − v_j‖ / ‖x_i − x_j‖: a chord over the skipped steps
                k = norm(v - last_v) / norm(x - last_x)
            last_x, last_v = x, v
        else:
            v = x + (last_v - last_x)  # v̂_t = x_t + Δ_i
        pattern += "C" if compute else "S"
        x = x - dt * v
    return pattern, x
