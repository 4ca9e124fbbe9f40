"""EasyCache on a diffusers video pipeline: one call puts the paper's rule on the pipeline's transformer.

    from easycache import EasyCacheConfig
    from easycache.diffusers import apply_easycache, get_easycache
    apply_easycache(pipe.transformer, EasyCacheConfig(thresh=0.05, warmup=10), num_inference_steps=50)
    video = pipe(prompt, num_inference_steps=50).frames[0]
    print(get_easycache(pipe.transformer).stats)        # computed / skipped steps, NFE ratio; `.trace` too

How it sits in diffusers. The hook is a `diffusers.hooks.ModelHook` registered in the transformer's own
`HookRegistry` (the mechanism of diffusers' FirstBlockCache / MagCache), on the transformer itself, not on
its blocks: EasyCache's decision is end to end (paper Sec. 3; the authors' code compares the model's input
and output), so the hook sees the whole input latent and the whole output, also under diffusers' context
parallelism, whose split and gather happen inside the transformer. The decision is `easycache.EasyCache`
itself, the class the sample scripts use, fed exactly what their loops feed it:
    x  the noisy latent of the step: `hidden_states` without the channels a pipeline concatenates after it
       (image-to-video: Wan's mask + image latents, HunyuanVideo-I2V's image latents), i.e. its first
       `out_channels` channels, since the transformer predicts a velocity of the latent alone;
    v  one output per branch, keyed by the pipeline's `cache_context("cond")` / `("uncond")` names.

One decision per denoising step, shared by the branches (the authors' `should_calc_current_pair`; the
conditional branch drives k): the hook numbers the steps itself (`StepClock`) from the context's
`step_index` when the pipeline passes one (WanPipeline), otherwise from the call pattern (a branch seen
again, or a new timestep, starts a step), so guidance_scale 1 (cond only) and embedded guidance
(HunyuanVideo, one branch) work the same way. A branch's calls after the first in a step are answered from
the decision already taken: computed, or `x + Δ_branch` without running the transformer.

Wan2.2 (two experts, `boundary_ratio`): apply the hook to both transformers with one clock,
    apply_easycache(pipe.transformer_2, config, num_inference_steps=N, share_steps_with=pipe.transformer)
Each expert keeps its own EasyCache (its own Δ and k: the two are different networks), numbered with the
pipeline's global steps, so the warm-up R and the forced last step mean the same steps as in one model; the
expert that takes over at the boundary has no Δ yet and computes (EasyCache's "no_k"), then learns its k.

Multi-GPU: when torch.distributed is initialised (or a `group` is given), rank 0's decision is broadcast
each step (`EasyCache(..., decision_group=group)`, the sample scripts' mechanism), so every rank takes the
same branch of the control flow even if a statistic differs in its last bit (xfuser makes the same choice; a
divergent step would desynchronise the collectives and hang).
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.distributed as dist
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from .cache import EasyCache, EasyCacheConfig

HOOK_NAME = "easycache"
DEFAULT_BRANCH = "inference"  # a call outside any cache_context (diffusers' hooks use the same name)


class StepClock:
    """Numbers a pipeline run's denoising steps from the transformer calls (Wan2.2's experts share one)."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        self.generation = -1  # pipeline runs seen (a new run restarts the step numbers)
        self.step = -1
        self._branches: set[str] = set()  # branches already called in this step
        self._t: float | None = None  # noise level (largest timestep value) of this step

    def advance(self, branch: str, timestep, context) -> tuple[int, int]:
        """(generation, step) of a call of `branch` at `timestep`."""
        index = getattr(context, "step_index", None)
        total = getattr(context, "num_inference_steps", None)
        if total is not None and total != self.num_steps:
            raise ValueError(
                f"the pipeline runs {total} steps but apply_easycache got num_inference_steps="
                f"{self.num_steps}: pass the same number to both"
            )
        t = _noise_level(timestep)
        repeated = branch in self._branches
        if index is not None:  # the pipeline says where it is (WanPipeline)
            if index != self.step or repeated:
                self._start(index, restart=self.generation < 0 or index <= self.step, t=t)
        elif self.step < 0 or repeated or (t is not None and self._t is not None and t != self._t):
            # A new step from the call pattern. A run starts again when the noise level goes back up.
            restart = self.generation < 0 or (t is not None and self._t is not None and t > self._t)
            if not restart and self.step + 1 >= self.num_steps:
                raise ValueError(
                    f"the pipeline runs more than num_inference_steps={self.num_steps} steps: pass the "
                    "same number to apply_easycache and to the pipeline"
                )
            self._start(0 if restart else self.step + 1, restart=restart, t=t)
        self._branches.add(branch)
        return self.generation, self.step

    def finish(self) -> None:
        """The pipeline run is over (diffusers resets stateful hooks at its end): check it, start afresh."""
        self._check_finished()
        self.reset()

    def _check_finished(self) -> None:
        if self.generation >= 0 and self.step < self.num_steps - 1:
            # The forced last step never came: the run was interrupted or had fewer steps than announced.
            warnings.warn(
                f"EasyCache: the pipeline run stopped after step {self.step} of the {self.num_steps} given "
                "to apply_easycache (interrupted, or a different num_inference_steps)",
                stacklevel=5,
            )

    def _start(self, step: int, *, restart: bool, t: float | None) -> None:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} is outside the {self.num_steps} steps apply_easycache was given")
        if restart:
            self._check_finished()
            self.generation += 1
        self.step, self._t, self._branches = step, t, set()


class _NoState(BaseState):
    """StateManager needs a state class; the hook only reads the manager's context (the branch name)."""

    def reset(self) -> None:
        pass


class EasyCacheHook(ModelHook):
    """Runs the transformer or answers with x + Δ, as `EasyCache` decides, once per step for all branches."""

    _is_stateful = True

    def __init__(
        self,
        config: EasyCacheConfig,
        num_steps: int,
        clock: StepClock,
        latent_channels: int | None,
        group: dist.ProcessGroup | None,
    ):
        super().__init__()
        self.config, self.num_steps, self.clock = config, num_steps, clock
        self.latent_channels, self.group = latent_channels, group
        # diffusers' cache_context(name) sets the context of every StateManager of a stateful hook: this is
        # how the hook learns which branch (cond / uncond) a call belongs to.
        self.contexts = StateManager(_NoState)
        self._signature: inspect.Signature | None = None
        self._reset()

    def _reset(self) -> None:
        self.cache: EasyCache | None = None  # the current (or last) run's cache
        self._generation, self._step = -1, -1
        self._x: Tensor | None = None  # x of the step in flight
        self._compute: bool | None = None  # its decision
        self._outputs: dict[str, Tensor] = {}  # branch outputs of a computed step, before update()
        self._reused: dict[str, Tensor] | None = None  # x + Δ per branch of a skipped step
        self._names: tuple[str, ...] | None = None  # the branches of a step, known after one computed step

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        if self.latent_channels is None:
            config = getattr(module, "config", None)
            # A transformer predicts the velocity of the noisy latent alone: its output channels are the
            # latent's, the rest of hidden_states is condition (I2V). Wan: out_channels 16 of in 36.
            channels = getattr(config, "out_channels", None) or getattr(config, "in_channels", None)
            self.latent_channels = channels
        if not self.latent_channels:
            raise ValueError(
                f"{type(module).__name__} has no config.out_channels: pass latent_channels= to "
                "apply_easycache"
            )
        return module

    def reset_state(self, module: nn.Module) -> nn.Module:
        # diffusers calls this at the end of every pipeline run (maybe_free_model_hooks): the run's cache
        # stays readable through get_easycache until the next run starts a fresh one.
        self._finish_step()
        last = self.cache
        self.contexts.reset()
        self.clock.finish()
        self._reset()
        self.cache = last
        return module

    @torch.compiler.disable  # host-side control flow (one sync per decision), as diffusers' cache hooks
    def new_forward(self, module: nn.Module, *args, **kwargs):
        bound = self._signature.bind(module, *args, **kwargs).arguments
        hidden_states = bound["hidden_states"]  # [B, C_in, F, H, W]
        # The pipeline's cache_context: a CacheContext (diffusers >= 0.42: name, step_index, ...), a plain
        # name in older versions, None outside any cache_context.
        context = getattr(self.contexts, "_context", getattr(self.contexts, "_current_context", None))
        branch = DEFAULT_BRANCH if context is None else getattr(context, "name", context)
        generation, step = self.clock.advance(branch, bound.get("timestep"), context)
        if (generation, step) != (self._generation, self._step):
            self._begin_step(generation, step, hidden_states[:, : self.latent_channels])
        if self._names is not None and branch not in self._names:
            raise RuntimeError(
                f"EasyCache: branch {branch!r} appeared at step {step}; the branches of this run are "
                f"{', '.join(self._names)} (one cache serves one set of cache_context names)"
            )
        if self._compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self._outputs[branch] = output[0]  # tuple or Transformer2DModelOutput: the sample comes first
            if self._names is not None and set(self._outputs) == set(self._names):
                self._finish_step()  # every branch is in: hand the step to EasyCache now
            return output
        v = self._reused[branch]  # v̂_t = x_t + Δ_i of this branch, [B, C_out, F, H, W]
        if bound.get("return_dict", True):
            return Transformer2DModelOutput(sample=v)
        return (v,)

    def _begin_step(self, generation: int, step: int, x: Tensor) -> None:
        self._finish_step()
        if generation != self._generation:  # a new pipeline run: a fresh cache, as the sample scripts build
            group = _resolve_group(self.group)
            # With a group, rank 0's decision is broadcast inside should_compute (StepCache.decision_group).
            self.cache = EasyCache(self.config, self.num_steps, first_step=step, decision_group=group)
            self._generation, self._names, self.group = generation, None, group
        elif step != self._step + 1:
            raise RuntimeError(
                f"EasyCache: this transformer ran step {self._step}, then step {step}; one transformer must "
                "run consecutive steps (Wan2.2: share_steps_with= the other expert)"
            )
        compute = self.cache.should_compute(step, x)
        self._generation, self._step, self._x, self._compute = generation, step, x, compute
        self._outputs = {}
        self._reused = None if compute else self.cache.reuse(x)

    def _finish_step(self) -> None:
        """Give a computed step's outputs to EasyCache ("cond" first when present: it drives k)."""
        if self._compute and self._outputs:
            names = sorted(self._outputs, key=lambda n: n != "cond")  # stable: call order otherwise
            self.cache.update(self._x, {n: self._outputs[n] for n in names})
            self._names = tuple(names)
        self._outputs, self._compute = {}, None


def _noise_level(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, Tensor):
        # Largest value: Wan2.2 TI2V gives per-token timesteps [B, L] with 0 on the clean first frame.
        return float(timestep.detach().float().max())  # one tiny host sync per call
    return float(timestep)


def _resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


#####  public API  #####


def apply_easycache(
    transformer: nn.Module,
    config: EasyCacheConfig,
    num_inference_steps: int,
    *,
    share_steps_with: nn.Module | None = None,
    latent_channels: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Put EasyCache on a diffusers transformer (WanTransformer3DModel, HunyuanVideoTransformer3DModel, ...).

    Args:
        transformer: the pipeline's transformer (`pipe.transformer`); registered through its HookRegistry.
        config: EasyCacheConfig (τ, R, ...): the paper's Wan2.1 setting by default.
        num_inference_steps: the steps the pipeline will run (R and the forced last step count in them).
        share_steps_with: Wan2.2's other expert, already hooked: both number the steps with one clock.
        latent_channels: channels of the noisy latent at the front of hidden_states (default:
            config.out_channels, which is right for Wan and HunyuanVideo T2V and I2V).
        group: process group whose rank 0 decides (default: the world, when torch.distributed is
            initialised with more than one rank).
    """
    if not isinstance(config, EasyCacheConfig):
        raise TypeError(f"config must be an EasyCacheConfig, got {type(config).__name__}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    EasyCache(config, num_inference_steps)  # refuses R >= steps etc. now, not at the first call
    if getattr(transformer, "is_cache_enabled", False):
        raise ValueError(
            "the transformer has a diffusers cache enabled: call transformer.disable_cache() first"
        )
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError("EasyCache is already applied to this transformer: remove_easycache() it first")
    if share_steps_with is not None:
        other = _hook(share_steps_with)
        if other.num_steps != num_inference_steps:
            raise ValueError(
                f"share_steps_with has num_inference_steps={other.num_steps}, this call {num_inference_steps}"
            )
        clock = other.clock
    else:
        clock = StepClock(num_inference_steps)
    hook = EasyCacheHook(config, num_inference_steps, clock, latent_channels, group)
    registry.register_hook(hook, HOOK_NAME)  # on the transformer itself: cache_context always reaches it


def get_easycache(transformer: nn.Module) -> EasyCache | None:
    """The EasyCache of the transformer's current or last pipeline run (None before the first call); its
    `trace` has one record per step this transformer decided, `stats` the computed/skipped steps."""
    hook = _hook(transformer)
    hook._finish_step()  # the outputs of the last step reach EasyCache once every branch was called
    return hook.cache


def remove_easycache(transformer: nn.Module) -> EasyCache | None:
    """Take the hook off (the transformer runs every call again); returns the last run's EasyCache."""
    cache = get_easycache(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(HOOK_NAME, recurse=False)
    return cache


def _hook(transformer: nn.Module) -> EasyCacheHook:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None:
        raise ValueError(f"{type(transformer).__name__} has no EasyCache: call apply_easycache() on it first")
    return hook


__all__ = ["HOOK_NAME", "EasyCacheHook", "StepClock", "apply_easycache", "get_easycache", "remove_easycache"]
