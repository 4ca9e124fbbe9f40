"""train_wan_tiny.py: the DiT's learning-rate schedule and the early checks of its command line (the training
itself runs for hours and is never run by the tests)."""

import argparse
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.toy_videos import GEOMETRIES, Caption, coverage
from train_wan_tiny import (
    PROBE_CAPTIONS,
    VAE_ARCH,
    check_geometry,
    dit_lr,
    dit_shift,
    dit_update,
    export,
    flow_loss,
    init_from,
    latent_masks,
    load_dit_state,
    make_latents,
    parse_shifts,
    parse_stages,
    probe,
    save_dit_state,
    steering,
    swap_word,
    train_decoder,
    train_dit,
    vae_weights,
)

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
        (["--dit_fg_weight", "-1"], "--dit_fg_weight must be finite and >= 0"),
        (["--dit_fg_weight", "inf"], "--dit_fg_weight must be finite and >= 0"),
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


def test_latent_masks_follow_the_shape_on_the_latent_grid():
    caps = [
        "a red circle moving right on a blue background",
        "a white triangle moving up on a black background",
    ]
    masks = latent_masks(caps, [3, 4])
    assert masks.shape == (2, 1, 5, 16, 16) and masks.dtype == torch.bool
    for cap, seed, mask in zip(caps, [3, 4], masks[:, 0]):
        cover = coverage(cap, seed) > 0  # [17, 64, 64]
        # The Wan-VAE's causal time axis: latent frame 0 <- frame 0, latent frame k <- frames 4k-3 .. 4k.
        for k, frames in enumerate([[0], *[range(4 * k - 3, 4 * k + 1) for k in range(1, 5)]]):
            pixels = np.any(cover[list(frames)], axis=0)  # [64, 64]
            grid = pixels.reshape(16, 4, 16, 4).any(axis=(1, 3))  # [16, 16]: touched latent pixels
            ring = np.zeros_like(grid)  # one latent pixel more all round
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ring |= np.roll(np.roll(np.pad(grid, 1), dy, 0), dx, 1)[1:-1, 1:-1]
            assert np.array_equal(mask[k].numpy(), ring)
        assert 0.05 < mask.float().mean() < 0.5  # the shape and its ring, not the frame


def test_flow_loss_weights_the_shape_and_stays_on_the_mse_scale():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 5, 16, 16, generator=g), torch.randn(2, 16, 5, 16, 16, generator=g)
    masks = torch.zeros(2, 1, 5, 16, 16, dtype=torch.bool)
    masks[..., 4:8, 4:8] = True
    plain = torch.nn.functional.mse_loss(pred, target)
    assert flow_loss(pred, target, None, 0.0) == plain  # --dit_fg_weight 0: the shipped recipe's MSE
    assert flow_loss(pred, target, masks, 0.0) == plain
    assert torch.allclose(
        flow_loss(target + 1.0, target, masks, 4.0), torch.tensor(1.0)
    )  # uniform error -> MSE
    inside, outside = target.clone(), target.clone()
    inside[..., 4:8, 4:8] += 1.0  # the same error, on the shape or off it
    outside[..., 8:12, 8:12] += 1.0
    assert flow_loss(inside, target, masks, 4.0) == pytest.approx(
        5 * flow_loss(outside, target, masks, 4.0).item()
    )


def test_fg_weight_needs_latents_with_masks(tmp_path):
    # A latents.pt written before the masks existed: asking for the weight fails with what to do, at once.
    torch.save({"latents": torch.zeros(2, 16, 5, 16, 16).half(), "caption": torch.zeros(2, dtype=torch.long),
                "context": torch.zeros(2, 16, 64)}, tmp_path / "latents.pt")  # fmt: skip
    args = argparse.Namespace(work_dir=str(tmp_path), dit_fg_weight=4.0, shapes="small")
    with pytest.raises(ValueError, match="has no shape masks"):
        train_dit(args)
    assert sorted(os.listdir(tmp_path)) == ["latents.pt"]  # nothing written


def test_shapes_must_match_the_latents(tmp_path):
    # latents.pt is made once per work dir: --shapes large on a small data set (or one older than the flag,
    # which holds small shapes) fails before anything is trained or overwritten.
    torch.save({"latents": torch.zeros(2, 16, 5, 16, 16).half(), "caption": torch.zeros(2, dtype=torch.long),
                "context": torch.zeros(2, 16, 64)}, tmp_path / "latents.pt")  # fmt: skip
    before = (tmp_path / "latents.pt").read_bytes()
    args = argparse.Namespace(work_dir=str(tmp_path), dit_fg_weight=0.0, shapes="large")
    with pytest.raises(ValueError, match="holds the 'small' shapes, not the 'large'"):
        train_dit(args)
    with pytest.raises(ValueError, match="holds the 'small' shapes"):
        make_latents(args)
    assert sorted(os.listdir(tmp_path)) == ["latents.pt"] and (tmp_path / "latents.pt").read_bytes() == before


def test_a_geometry_name_that_changed_meaning_is_refused(tmp_path):
    # "large" drew squares of half side r before it drew them of 1.2 r: a data set written under the old
    # meaning (its spec recorded, or no spec at all) is refused, under the same name, before any training.
    old = dataclasses.asdict(dataclasses.replace(GEOMETRIES["large"], square=1.0))
    args = argparse.Namespace(work_dir=str(tmp_path), dit_fg_weight=0.0, shapes="large")
    for extra, message in (({"geometry_spec": old}, "'square': 1.0"), ({}, "no spec recorded")):
        data = {"latents": torch.zeros(2, 16, 5, 16, 16).half(), "caption": torch.zeros(2, dtype=torch.long),
                "context": torch.zeros(2, 16, 64), "geometry": "large"}  # fmt: skip
        torch.save({**data, **extra}, tmp_path / "latents.pt")
        for stage in (train_dit, make_latents):
            with pytest.raises(ValueError, match=f"made as .*{message}.*GEOMETRIES\\['large'\\] is now"):
                stage(args)
        assert sorted(os.listdir(tmp_path)) == ["latents.pt"]


def test_a_spec_recorded_before_a_geometry_field_existed_reads_it_at_its_default(tmp_path):
    # Data sets of "large" were written before `Geometry.inset` existed; they were made with no inset, so they
    # stay valid for "large" (inset 0), while the same spec under "large-inset" (inset 0.08) is refused.
    spec = {k: v for k, v in dataclasses.asdict(GEOMETRIES["large"]).items() if k != "inset"}
    data = {"geometry": "large", "geometry_spec": spec}
    check_geometry(data, "latents.pt", "large")
    with pytest.raises(ValueError, match="'inset': 0.08"):
        check_geometry({**data, "geometry": "large-inset"}, "latents.pt", "large-inset")


def test_swap_word_changes_one_attribute_to_a_valid_caption():
    for cap in PROBE_CAPTIONS:
        for attribute in ("colour", "shape", "direction", "background"):
            other = swap_word(cap, attribute)
            other.validate()
            changed = [
                k
                for k in ("colour", "shape", "direction", "background")
                if getattr(other, k) != getattr(cap, k)
            ]
            assert changed == [attribute]
    # "white on blue" -> the next colour, blue, would be invisible on blue: skipped to the one after.
    assert swap_word(Caption("green", "circle", "down", "blue"), "colour").colour == "yellow"


def test_steering_is_one_for_a_dit_that_follows_the_text_and_zero_for_one_that_does_not():
    g = torch.Generator().manual_seed(1)
    z_a, z_b, noise = (torch.randn(3, 16, 5, 4, 4, generator=g) for _ in range(3))
    ctx_a, ctx_b, null = (torch.full((3, 16, 64), v) for v in (1.0, 2.0, 0.0))
    target = {1.0: z_a, 2.0: z_b, 0.0: 0.5 * (z_a + z_b)}  # what each caption "means" in latent space

    def oracle(x_t, t, ctx):  # the exact velocity toward the latent its caption names
        return noise - target[ctx[0, 0, 0].item()]

    def blind(x_t, t, ctx):  # a DiT that reads only the noisy latent
        return x_t * 0.3

    for sigma in (0.3, 0.9):
        follows = steering(oracle, z_a, z_b, ctx_a, ctx_b, null, noise, sigma, guide=5.0)
        ignores = steering(blind, z_a, z_b, ctx_a, ctx_b, null, noise, sigma, guide=5.0)
        assert follows.shape == (3,) and torch.allclose(follows, torch.ones(3), atol=1e-5)
        assert torch.equal(ignores, torch.zeros(3))
    # A DiT that swaps the two captions' meanings moves x0 the wrong way: -1.
    target = {1.0: z_b, 2.0: z_a, 0.0: 0.5 * (z_a + z_b)}
    swapped = steering(oracle, z_a, z_b, ctx_a, ctx_b, null, noise, 0.5, guide=1.0)
    assert torch.allclose(swapped, -torch.ones(3), atol=1e-5)


def test_probe_names_the_missing_stage(tmp_path):
    args = argparse.Namespace(work_dir=str(tmp_path), shapes="small", seed=0, probe_guide=5.0)
    with pytest.raises(FileNotFoundError, match="needs .*latents.pt: run --stage latents first"):
        probe(args)
    assert os.listdir(tmp_path) == []


def test_stages_run_in_pipeline_order():
    assert parse_stages("all") == ["vae", "latents", "dit", "decoder", "export"]
    assert parse_stages("dit,latents") == ["latents", "dit"]  # a comma list runs in the pipeline's order
    assert parse_stages("probe") == ["probe"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown stage\(s\) \['vea'\]"):
        parse_stages("vae,vea")


def tiny_run(work) -> tuple[dict, dict]:
    """A work dir as the vae and dit stages leave it (random weights): (VAE state dict, DiT EMA)."""
    from diffusers import AutoencoderKLWan

    from models.wan import WAN_CONFIGS, WanModel
    from models.wan_vae import WanVAEConfig

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**WanVAEConfig(**VAE_ARCH).diffusers_kwargs()).state_dict()
    model, ema = WanModel(WAN_CONFIGS["tiny"]).state_dict(), WanModel(WAN_CONFIGS["tiny"]).state_dict()
    os.makedirs(work, exist_ok=True)
    torch.save({"model": vae, "opt": {}, "step": 2700}, os.path.join(work, "vae_state.pt"))
    torch.save({"model": model, "ema": ema, "opt": {}, "step": 9000}, os.path.join(work, "dit_state.pt"))
    return vae, ema


def assert_fine_tune_start(work, vae: dict, dit: dict, vae_stop: int) -> None:
    v, d = (torch.load(os.path.join(work, f), weights_only=False) for f in ("vae_state.pt", "dit_state.pt"))
    assert v["step"] == vae_stop and "opt" not in v  # a finished VAE: the vae stage has nothing to do
    assert d["step"] == 0 and "opt" not in d  # a new DiT schedule, fresh optimiser
    for got, want in ((v["model"], vae), (d["model"], dit), (d["ema"], dit)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_init_from_a_work_dir_takes_its_vae_and_the_dit_ema(tmp_path):
    vae, ema = tiny_run(tmp_path / "base")
    args = argparse.Namespace(init_from=str(tmp_path / "base"), work_dir=str(tmp_path / "ft"), vae_stop=2700)
    os.makedirs(args.work_dir)
    init_from(args)
    assert_fine_tune_start(args.work_dir, vae, ema, 2700)


def test_init_from_an_export_gives_the_same_start_as_its_work_dir(tmp_path):
    from safetensors.torch import save_file

    from models.wan_vae import WAN_VAE_FILE, convert_diffusers_wan_vae_to_official

    vae, ema = tiny_run(tmp_path / "base")
    exported = tmp_path / "export"  # what --stage export writes of those states (official layout)
    os.makedirs(exported)
    torch.save(convert_diffusers_wan_vae_to_official(vae), exported / WAN_VAE_FILE)
    save_file({k: v.contiguous() for k, v in ema.items()}, exported / "diffusion_pytorch_model.safetensors")
    args = argparse.Namespace(init_from=str(exported), work_dir=str(tmp_path / "ft"), vae_stop=1234)
    os.makedirs(args.work_dir)
    init_from(args)
    assert_fine_tune_start(args.work_dir, vae, ema, 1234)


def test_init_from_keeps_the_work_dirs_own_states(tmp_path):
    tiny_run(tmp_path / "base")
    work = tmp_path / "ft"
    vae, ema = tiny_run(work)  # a fine-tune under way: resume it, never restart it from --init_from
    before = {f: (work / f).read_bytes() for f in ("vae_state.pt", "dit_state.pt")}
    init_from(argparse.Namespace(init_from=str(tmp_path / "base"), work_dir=str(work), vae_stop=2700))
    assert {f: (work / f).read_bytes() for f in before} == before


def test_init_from_something_else_fails_and_writes_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vae_state.pt").write_bytes(b"")  # half a work dir
    args = argparse.Namespace(init_from=str(tmp_path / "src"), work_dir=str(tmp_path / "ft"), vae_stop=2700)
    os.makedirs(args.work_dir)
    with pytest.raises(FileNotFoundError, match="neither a work dir .* nor an exported checkpoint"):
        init_from(args)
    assert os.listdir(args.work_dir) == []


def test_dit_fine_tune_starts_from_the_given_weights(tmp_path):
    # One training step from an --init_from start: the optimiser is made fresh (the state has none), the
    # model moves away from the given weights and the EMA follows from them (decay 1/10 at step 0).
    _, ema = tiny_run(tmp_path / "base")
    work = tmp_path / "ft"
    os.makedirs(work)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 5, 16, 16, generator=g).half()
    data = {"latents": latents, "caption": torch.tensor([0, 1, 0, 1]),
            "context": torch.randn(3, 16, 64, generator=g), "geometry": "large",
            "geometry_spec": dataclasses.asdict(GEOMETRIES["large"])}  # fmt: skip
    torch.save(data, work / "latents.pt")
    args = argparse.Namespace(
        init_from=str(tmp_path / "base"), work_dir=str(work), vae_stop=2700, shapes="large", seed=0,
        dit_fg_weight=0.0, dit_lr=5e-4, dit_steps=1, dit_cycles=1, dit_lr_decay=0.5, dit_batch=2,
        dit_shift=[3.0], cfg_dropout=0.1, ema=0.999, save_every=100,
    )  # fmt: skip
    init_from(args)
    train_dit(args)
    state = torch.load(work / "dit_state.pt", weights_only=False)
    assert state["step"] == 1 and "opt" in state
    assert max((state["model"][k] - ema[k]).abs().max().item() for k in ema) > 0
    for k in ema:
        torch.testing.assert_close(state["ema"][k] - ema[k], 0.9 * (state["model"][k] - ema[k]))


def test_export_with_other_latent_statistics_fails_and_writes_nothing(tmp_path):
    # WAN_VAE_TINY must hold the statistics the DiT was trained with (the sample script builds the VAE from
    # it): a work dir measured on other data is refused before anything in --out_dir is touched.
    tiny_run(tmp_path)
    stats = {"mean": [0.0] * 16, "std": [1.0] * 16}
    torch.save({"stats": stats}, tmp_path / "latents.pt")
    out = tmp_path / "export"
    args = argparse.Namespace(work_dir=str(tmp_path), out_dir=str(out), seed=0)
    with pytest.raises(ValueError, match="set models.wan_vae.WAN_VAE_TINY's statistics"):
        export(args)
    assert not out.exists()


def decoder_args(work, steps: int, shapes: str = "large") -> argparse.Namespace:
    return argparse.Namespace(
        work_dir=str(work), shapes=shapes, seed=0, dec_steps=steps, dec_batch=1, dec_lr=2e-4, save_every=1
    )


def test_decoder_fine_tune_moves_only_the_decoder_and_resumes_exactly(tmp_path):
    vae, _ = tiny_run(tmp_path / "a")
    tiny_run(tmp_path / "b")
    before = (tmp_path / "a" / "vae_state.pt").read_bytes()
    train_decoder(decoder_args(tmp_path / "a", 2))  # two steps at once ...
    train_decoder(decoder_args(tmp_path / "b", 1))  # ... or one, then resumed for the second
    train_decoder(decoder_args(tmp_path / "b", 2))
    a, b = vae_weights(str(tmp_path / "a")), vae_weights(str(tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "decoder_state.pt", weights_only=False)["step"] == 2
    assert a.keys() == vae.keys() and all(torch.equal(a[k], b[k]) for k in a)
    decoder = [k for k in vae if k.startswith(("decoder.", "post_quant_conv."))]
    assert decoder and all(k.startswith(("encoder.", "quant_conv.")) for k in vae.keys() - set(decoder))
    # The encoder (so latents.pt and the DiT trained on it) is untouched; the decoder moved.
    assert all(torch.equal(a[k], vae[k]) for k in vae.keys() - set(decoder))
    assert any(not torch.equal(a[k], vae[k]) for k in decoder)
    assert (tmp_path / "a" / "vae_state.pt").read_bytes() == before  # the vae stage's result is kept
    kept = torch.load(tmp_path / "a" / "vae_state.pt", weights_only=False)["model"]
    assert all(torch.equal(kept[k], vae[k]) for k in vae)
    # A fine-tune from this work dir starts from the new decoder, as one from its export would.
    ft = tmp_path / "ft"
    os.makedirs(ft)
    init_from(argparse.Namespace(init_from=str(tmp_path / "a"), work_dir=str(ft), vae_stop=2700))
    started = torch.load(ft / "vae_state.pt", weights_only=False)["model"]
    assert all(torch.equal(started[k], a[k]) for k in a)


def test_decoder_fine_tune_on_other_shapes_is_refused(tmp_path):
    tiny_run(tmp_path)
    train_decoder(decoder_args(tmp_path, 1))
    before = (tmp_path / "decoder_state.pt").read_bytes()
    with pytest.raises(ValueError, match="fine-tunes the decoder on .* not the --shapes small"):
        train_decoder(decoder_args(tmp_path, 2, shapes="small"))
    assert (tmp_path / "decoder_state.pt").read_bytes() == before


def test_dit_update_steps_the_model_and_ramps_the_ema():
    # the inner step shared by the T2V and I2V runs: AdamW on the model, then the EMA lerps towards it with
    # decay min(ema, (1 + step) / (10 + step)): 0.1 at step 0, so the EMA moves 90% of the way there
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema.load_state_dict(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss = model(torch.ones(1, 3)).square().sum()
    dit_update(model, ema, opt, loss, 0, 0.999)
    for b, p, e in zip(before, model.parameters(), ema.parameters()):
        assert not torch.equal(p, b)
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p.detach(), rtol=0, atol=1e-6)


def test_dit_state_round_trip_and_a_fine_tune_start_without_optimiser(tmp_path):
    # what both DiT runs (T2V and I2V) resume from: weights, EMA, optimiser, generator, the next step
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    dit_update(model, ema, opt, model(torch.ones(1, 3)).sum(), 0, 0.999)
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    path = str(tmp_path / "dit_state.pt")
    save_dit_state(path, model, ema, opt, gen, 7)
    model2, ema2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt2, gen2 = torch.optim.AdamW(model2.parameters(), lr=0.1), torch.Generator()
    assert load_dit_state(path, model2, ema2, opt2, gen2) == 7
    for a, b in ((model, model2), (ema, ema2)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=gen2))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # --init_from writes weights and step 0 only: the optimiser and generator stay fresh
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 0}, path)
    opt3 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    assert load_dit_state(path, model2, ema2, opt3, torch.Generator()) == 0 and not opt3.state_dict()["state"]
