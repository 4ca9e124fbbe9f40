"""EasyCache's decision rule on trajectories whose skip pattern can be worked out by hand."""

import dataclasses
import json
import math

import pytest
import torch

from easycache import EasyCache, EasyCacheConfig


def run(cache, xs, model):
    """Drive a cache over a fixed list of inputs; returns the decisions and the (approximated) outputs."""
    decisions, outs = [], []
    for step, x in enumerate(xs):
        if cache.should_compute(step, x):
            v = model(x)
            cache.update(x, v)
        else:
            v = cache.reuse(x)
        decisions.append("C" if cache.trace[-1]["compute"] else "S")
        outs.append(v)
    return "".join(decisions), outs


def linear_trajectory(n, shape=(2, 3, 4)):
    # x_t = (1 − 0.05 t)·1, so ‖x_t − x_{t−1}‖ = 0.05 and ‖x_t‖ = 1 − 0.05 t
    return [torch.full(shape, 1.0 - 0.05 * t) for t in range(n)]


def test_hand_worked_pattern():
    # v = 2x, so k = 2 exactly and ε_t = 2·0.05 / ‖v_i‖ = 0.05 / s_i, with s_i = 1 − 0.05 i.
    # R = 2: steps 0, 1 compute (k = 2 from the pair). From i = 1 (s = 0.95): ε = 0.0526 per step, so
    # E = 0.053, 0.105, 0.158, 0.211 at steps 2..5 (skip), 0.263 ≥ 0.25 at step 6 (compute, E = 0).
    # From i = 6 (s = 0.7): ε = 0.0714: steps 7, 8 skip (E = 0.071, 0.143); step 9 is the last: compute.
    cache = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
    pattern, _ = run(cache, linear_trajectory(10), lambda x: 2 * x)
    assert pattern == "CCSSSSCSSC"
    trace = cache.trace
    assert [r["reason"] for r in trace] == ["warmup"] * 2 + ["reuse"] * 4 + ["threshold"] + ["reuse"] * 2 + [
        "last_step"
    ]
    assert trace[6]["k"] == pytest.approx(2.0) and trace[6]["rate"] == pytest.approx(2.0)
    assert trace[2]["eps"] == pytest.approx(0.05 / 0.95, rel=1e-5)
    assert trace[6]["acc"] == pytest.approx(5 * 0.05 / 0.95, rel=1e-5)
    assert trace[8]["acc"] == pytest.approx(2 * 0.05 / 0.7, rel=1e-5)
    assert all(r["input_change"] == pytest.approx(0.05, rel=1e-5) for r in trace[1:])
    s = cache.stats
    assert s["computed_steps"] == [0, 1, 6, 9] and s["skipped_steps"] == [2, 3, 4, 5, 7, 8]
    assert s["nfe_ratio"] == pytest.approx(10 / 4)


def test_k_is_the_chord_between_computed_steps():
    # v = x² elementwise: the rate between computed steps i and j is |s_i + s_j|. After the skip gap
    # 1 -> 6 the chord is 0.95 + 0.70 = 1.65, not the one-step rate 0.75 + 0.70.
    cache = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
    run(cache, linear_trajectory(10), lambda x: x * x)
    computed = cache.stats["computed_steps"]
    assert computed[:2] == [0, 1]
    i, j = computed[2], computed[1]
    s = lambda t: 1.0 - 0.05 * t  # noqa: E731
    assert cache.trace[i]["rate"] == pytest.approx(s(i) + s(j), rel=1e-5)
    assert cache.trace[1]["rate"] == pytest.approx(s(1) + s(0), rel=1e-5)


def test_thresh_zero_computes_every_step():
    cache = EasyCache(EasyCacheConfig(thresh=0.0, warmup=0), num_steps=12)
    pattern, _ = run(cache, linear_trajectory(12), lambda x: 2 * x)
    assert pattern == "C" * 12
    assert cache.stats["nfe_ratio"] == 1.0


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_huge_thresh_computes_only_warmup_first_pair_and_last(warmup):
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=warmup), num_steps=10)
    pattern, _ = run(cache, linear_trajectory(10), lambda x: 2 * x)
    # k needs two computed steps: with R < 2 the steps before it exists are computed too ("no_k").
    first = max(warmup, 2)
    assert pattern == "C" * first + "S" * (9 - first) + "C"
    reasons = [r["reason"] for r in cache.trace]
    assert reasons[:first] == ["warmup"] * warmup + ["no_k"] * (first - warmup)


def test_compute_last_off_lets_the_last_step_skip():
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2, compute_last=False), num_steps=6)
    pattern, _ = run(cache, linear_trajectory(6), lambda x: 2 * x)
    assert pattern == "CCSSSS"


def test_reuse_returns_x_plus_delta_exactly():
    torch.manual_seed(1)
    xs = [torch.randn(2, 4, 3, 5, 5) * (1 - 0.02 * t) for t in range(8)]
    w = torch.randn(2, 4, 3, 5, 5)
    model = lambda x: torch.tanh(x) * w + 0.3  # noqa: E731
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2), num_steps=8)
    _, outs = run(cache, xs, model)
    delta = model(xs[1]) - xs[1]
    for t in range(2, 7):
        assert torch.equal(outs[t], xs[t] + delta)
    assert torch.equal(outs[7], model(xs[7]))


def test_reuse_output_ablation_returns_last_output():
    xs = linear_trajectory(6)
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2, reuse_output=True), num_steps=6)
    _, outs = run(cache, xs, lambda x: 2 * x + 1)
    for t in range(2, 5):
        assert torch.equal(outs[t], 2 * xs[1] + 1)


def test_dict_branches_share_one_decision_and_keep_their_own_delta():
    xs = linear_trajectory(10)
    model = lambda x: {"cond": 2 * x, "uncond": 3 * x + 1}  # noqa: E731
    cache = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
    pattern, outs = run(cache, xs, model)
    assert pattern == "CCSSSSCSSC"  # driven by "cond" only: same as the tensor case
    assert list(outs[3]) == ["cond", "uncond"]
    assert torch.equal(outs[3]["cond"], xs[3] + (2 * xs[1] - xs[1]))
    assert torch.equal(outs[3]["uncond"], xs[3] + (3 * xs[1] + 1 - xs[1]))


def test_first_branch_drives_the_statistics():
    xs = linear_trajectory(10)
    # "cond" has k = 2 (same pattern as above); the noisy "uncond" branch must not influence anything.
    a = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
    pa, _ = run(a, xs, lambda x: {"cond": 2 * x, "uncond": 50 * x**3})
    b = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
    pb, _ = run(b, xs, lambda x: {"uncond": 50 * x**3, "cond": 2 * x})
    assert pa == "CCSSSSCSSC" and pb != pa


def test_cfg_level_caching_equals_per_branch_caching():
    # Guidance is linear, so caching the guided output's Δ gives what caching each branch does, provided the
    # decisions agree; here both caches are driven by the same first branch ("cond").
    torch.manual_seed(2)
    g = 5.0
    wc, wu = torch.randn(1, 4, 2, 6, 6), torch.randn(1, 4, 2, 6, 6)
    cond = lambda x: torch.sin(x) * wc + x  # noqa: E731
    uncond = lambda x: torch.cos(x) * wu - 0.5 * x  # noqa: E731
    guided = lambda v: v["uncond"] + g * (v["cond"] - v["uncond"])  # noqa: E731
    per_branch = EasyCache(EasyCacheConfig(thresh=0.3, warmup=3), num_steps=20)
    cfg_level = EasyCache(EasyCacheConfig(thresh=0.3, warmup=3), num_steps=20)
    x1 = x2 = torch.randn(1, 4, 2, 6, 6)
    for step in range(20):
        c1, c2 = per_branch.should_compute(step, x1), cfg_level.should_compute(step, x2)
        assert c1 == c2
        if c1:
            v = {"cond": cond(x1), "uncond": uncond(x1)}
            per_branch.update(x1, v)
            cfg_level.update(x2, {"cond": v["cond"], "guided": guided(v)})
            out1, out2 = guided(v), guided(v)
        else:
            out1 = guided(per_branch.reuse(x1))
            out2 = cfg_level.reuse(x2)["guided"]
        torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
        x1 = x1 - 0.05 * out1
        x2 = x2 - 0.05 * out2
    assert 0 < per_branch.stats["num_skipped"] < 16


def reference_sampling(x, model, n, thresh, warmup, dt=0.04):
    """An independent statement of the authors' rule (spec/method.md), driving an Euler loop."""
    norm = lambda t: t.abs().mean().item()  # noqa: E731
    prev_x = last_x = last_v = None
    k, acc, pattern = None, 0.0, ""
    for t in range(n):
        if t < warmup or t == n - 1:
            compute, acc = True, 0.0
        elif k is None:
            compute = True
        else:
            acc += k * norm(x - prev_x) / norm(last_v)
            compute = acc >= thresh
            if compute:
                acc = 0.0
        prev_x = x
        if compute:
            v = model(x, t)
            if last_v is not None:
                k = norm(v - last_v) / norm(x - last_x)
            last_x, last_v = x, v
        else:
            v = x + (last_v - last_x)
        pattern += "C" if compute else "S"
        x = x - dt * v
    return pattern, x


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.02, 0.05, 0.1, 0.3])
def test_matches_an_independent_restatement(seed, thresh):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 3, 6, 6)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # A smooth velocity field whose rate varies along the trajectory.
    model = lambda x, t: torch.tanh(a * x) + b * (1 + 0.03 * t) + 0.5 * x  # noqa: E731
    x0 = torch.randn(shape, generator=g)
    n, warmup = 30, 5
    want_pattern, want_x = reference_sampling(x0, model, n, thresh, warmup)
    cache = EasyCache(EasyCacheConfig(thresh=thresh, warmup=warmup), num_steps=n)
    x = x0
    for t in range(n):
        if cache.should_compute(t, x):
            v = model(x, t)
            cache.update(x, v)
        else:
            v = cache.reuse(x)
        x = x - 0.04 * v
    got = "".join("C" if r["compute"] else "S" for r in cache.trace)
    assert got == want_pattern
    torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-6)
    if thresh >= 0.05:
        assert "S" in got  # the comparison is not vacuous


@pytest.mark.parametrize("mode,expected", [("local", 4.0), ("mean", (1 + 2 + 4) / 3), ("ema", 2.75)])
def test_k_update_modes(mode, expected):
    # x_t = 1 + t (‖Δx‖ = 1) and v_t = x_t + c_t with c = 0, 0, 1, 4 in the warm-up, so the measured rates
    # are 1, 2, 4. ema with decay 0.5: 1 -> 0.5·1 + 0.5·2 = 1.5 -> 0.5·1.5 + 0.5·4 = 2.75.
    xs = [torch.full((4,), 1.0 + t) for t in range(8)]
    offsets = [0.0, 0.0, 1.0, 4.0]
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=4, k_update=mode, ema_decay=0.5), num_steps=8)
    run(cache, xs, lambda x: x + offsets[int(x[0].item()) - 1] if x[0] < 5 else 5 * x)
    assert [r["rate"] for r in cache.trace[1:4]] == pytest.approx([1.0, 2.0, 4.0])
    assert cache.trace[4]["k"] == pytest.approx(expected)


def test_zero_input_change_between_computed_steps_forces_a_compute():
    # Steps 0 and 1 see the same input: the rate's denominator is zero, so step 2 must compute ("degenerate").
    xs = [torch.ones(3), torch.ones(3), torch.full((3,), 0.9), torch.full((3,), 0.8), torch.full((3,), 0.7)]
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=0), num_steps=5)
    pattern, _ = run(cache, xs, lambda x: 2 * x + 1)
    assert pattern == "CCCSC"
    rec = cache.trace[2]
    assert rec["reason"] == "degenerate" and "not finite" in rec["note"]
    assert cache.trace[1]["rate"] is None and "rate" in cache.trace[1]["note"]


def test_all_zero_output_forces_a_compute():
    xs = linear_trajectory(6)
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2), num_steps=6)
    pattern, _ = run(cache, xs, lambda x: torch.zeros_like(x))
    assert pattern == "CCCCCC"  # ‖v_i‖ = 0 every time: ε would divide by zero
    assert {r["reason"] for r in cache.trace[2:5]} == {"degenerate"}


def test_nan_input_forces_a_compute_and_trace_stays_json():
    xs = linear_trajectory(6)
    xs[3] = torch.full_like(xs[3], float("nan"))
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2), num_steps=6)
    pattern, _ = run(cache, xs, lambda x: 2 * x)
    assert pattern[3] == "C" and cache.trace[3]["reason"] == "degenerate"
    json.dumps(cache.trace, allow_nan=False)  # non-finite values are None + a note, never NaN in JSON
    assert cache.trace[3]["input_change"] is None


def test_trace_and_stats_are_json_serialisable():
    cache = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
    xs = linear_trajectory(10)
    for step, x in enumerate(xs):
        if cache.should_compute(step, x):
            cache.update(x, 2 * x, dit_seconds=0.5)
        else:
            cache.reuse(x)
    text = json.dumps({"trace": cache.trace, "stats": cache.stats}, allow_nan=False)
    back = json.loads(text)
    assert set(back["trace"][0]) == {
        "step",
        "compute",
        "reason",
        "input_change",
        "k",
        "eps",
        "acc",
        "rate",
        "dit_seconds",
        "note",
    }
    assert back["stats"]["dit_seconds"] == pytest.approx(0.5 * 4)
    assert back["stats"]["config"]["thresh"] == 0.25
    assert "computed 4/10" in cache.summary()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(thresh=-0.1), "thresh"),
        (dict(thresh=float("nan")), "thresh"),
        (dict(thresh=float("inf")), "thresh"),
        (dict(thresh="0.1"), "thresh"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=2.5), "warmup"),
        (dict(k_update="avg"), "k_update"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(compute_last=1), "compute_last"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EasyCacheConfig(**kwargs)


def test_config_is_frozen():
    cfg = EasyCacheConfig()
    assert (cfg.thresh, cfg.warmup, cfg.compute_last, cfg.k_update) == (0.05, 10, True, "local")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.thresh = 0.1


def test_warmup_not_below_num_steps_is_rejected():
    with pytest.raises(ValueError, match="warmup"):
        EasyCache(EasyCacheConfig(warmup=10), num_steps=10)
    with pytest.raises(ValueError, match="num_steps"):
        EasyCache(EasyCacheConfig(warmup=0), num_steps=0)


def test_misuse_raises_clear_errors():
    x = torch.ones(3)
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2), num_steps=6)
    with pytest.raises(RuntimeError, match="should_compute"):
        cache.update(x, x)
    with pytest.raises(RuntimeError, match="expected step 0"):
        cache.should_compute(1, x)
    assert cache.should_compute(0, x)
    with pytest.raises(RuntimeError, match="call update"):
        cache.reuse(x)
    with pytest.raises(RuntimeError, match="not finished"):
        cache.should_compute(1, x)
    cache.update(x, {"cond": 2 * x, "uncond": x})
    assert cache.should_compute(1, 0.9 * x)
    with pytest.raises(ValueError, match="branches changed"):
        cache.update(0.9 * x, {"cond": 2 * x})
    with pytest.raises(ValueError, match="branches changed"):
        cache.update(0.9 * x, 2 * x)
    with pytest.raises(ValueError, match="shape"):
        cache.update(0.9 * x, {"cond": torch.ones(4), "uncond": torch.ones(4)})
    cache.update(0.9 * x, {"cond": 1.8 * x, "uncond": 0.9 * x})
    with pytest.raises(RuntimeError, match="expected step 2"):
        cache.should_compute(1, 0.8 * x)
    with pytest.raises(ValueError, match="changed shape"):
        cache.should_compute(2, torch.ones(4))
    assert not cache.should_compute(2, 0.8 * x)
    with pytest.raises(RuntimeError, match="call reuse"):
        cache.update(0.8 * x, {"cond": x, "uncond": x})
    cache.reuse(0.8 * x)
    for step in range(3, 6):
        cache.update(x, {"cond": x, "uncond": x}) if cache.should_compute(step, x) else cache.reuse(x)
    with pytest.raises(RuntimeError, match="beyond"):
        cache.should_compute(6, x)


def test_reuse_before_any_update_is_an_error():
    cache = EasyCache(EasyCacheConfig(), num_steps=20)
    cache._pending, cache._step = False, 0  # a decision to skip can never come first; force it
    with pytest.raises(RuntimeError, match="before any update"):
        cache.reuse(torch.ones(2))


def test_fresh_instances_give_identical_runs():
    xs = linear_trajectory(10)
    runs = []
    for _ in range(2):
        cache = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2), num_steps=10)
        pattern, outs = run(cache, xs, lambda x: 2 * x)
        runs.append((pattern, torch.stack(outs)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not math.isnan(runs[0][1].sum().item())


def test_first_step_keeps_global_step_numbers():
    """A cache joining at step s (Wan2.2's second expert): steps start at s, warm-up and the forced last
    step keep their global meaning, the first decisions after warm-up compute (no Δ, no k yet)."""
    x = torch.ones(1, 2, 3)

    def reasons(warmup: int) -> list[str]:
        late = EasyCache(EasyCacheConfig(thresh=10.0, warmup=warmup), 10, first_step=2)
        for step in range(2, 10):
            if late.should_compute(step, x * (1 + step)):
                late.update(x * (1 + step), x * (2 - step))
            else:
                late.reuse(x * (1 + step))
        return [r["reason"] for r in late.trace]

    assert reasons(4) == ["warmup", "warmup"] + ["reuse"] * 5 + ["last_step"]  # global steps 2, 3 < R
    assert reasons(2) == ["no_k", "no_k"] + ["reuse"] * 5 + ["last_step"]  # needs its own two computes
    with pytest.raises(RuntimeError, match="expected step 2"):
        EasyCache(EasyCacheConfig(), 20, first_step=2).should_compute(0, x)
    for bad in (-1, 20, True):
        with pytest.raises(ValueError, match="first_step"):
            EasyCache(EasyCacheConfig(), 20, first_step=bad)
