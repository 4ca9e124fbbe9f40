"""Reading official checkpoint files and loading them strictly; clear errors for missing or broken files."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn


def download_command(
    repo_id: str, local_dir: str, *, files: Iterable[str] = (), include: Iterable[str] = ()
) -> str:
    """The `hf download` command (huggingface_hub's CLI) that fetches exact `files` or glob patterns."""
    parts = [
        "hf download",
        repo_id,
        *files,
        *(f"--include '{p}'" for p in include),
        f"--local-dir {local_dir}",
    ]
    return " ".join(parts)


def require_files(ckpt_dir: str, files: Iterable[str], *, repo_id: str | None) -> None:
    """Fail early, before anything heavy, if any of `files` is missing in `ckpt_dir`; say how to get them."""
    missing = [f for f in files if not os.path.isfile(os.path.join(ckpt_dir, f))]
    if missing:
        how = (f"fetch them with: {download_command(repo_id, ckpt_dir, files=missing)}" if repo_id
               else "they ship with this repository: check out or restore them")  # fmt: skip
        raise FileNotFoundError(f"{ckpt_dir} lacks {', '.join(missing)}; {how}")


def load_file_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from one .safetensors or .pt/.pth file (pickles are read with weights_only=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        # weights_only: never unpickle arbitrary objects. mmap avoids holding a 25 GB file twice; it needs
        # torch's zip format (legacy pickles from torch < 1.6 are read into memory instead).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # safetensors/pickle errors differ by version; report them in one form
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a checkpoint?): {e}") from e


def load_sharded_safetensors(
    ckpt_dir: str,
    name: str = "diffusion_pytorch_model",
    *,
    cast: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """`name`.safetensors, or the shards listed by `name`.safetensors.index.json (diffusers' layout).

    Tensors are read one at a time and `cast(key, tensor)` (e.g. to bf16) is applied to each as it is read,
    so host memory peaks at the cast state dict plus the pages of the one shard being read (its memory map
    is closed before the next opens), never at the whole file-dtype state next to the cast one.
    """
    single = os.path.join(ckpt_dir, f"{name}.safetensors")
    index = os.path.join(ckpt_dir, f"{name}.safetensors.index.json")
    if os.path.isfile(single):
        return _read_safetensors(single, cast)
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{ckpt_dir} has neither {name}.safetensors nor {name}.safetensors.index.json"
        )
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    state_dict: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = _read_safetensors(os.path.join(ckpt_dir, shard), cast, expect=weight_map, shard=shard)
        state_dict.update(part)
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise ValueError(f"the index lists keys that no shard holds: {absent[:5]}")
    return state_dict


def _read_safetensors(
    path: str, cast: Callable[[str, Tensor], Tensor] | None, *, expect: dict | None = None, shard: str = ""
) -> dict[str, Tensor]:
    """One safetensors file, tensor by tensor through `cast`; with `expect` (an index's weight map) every
    key must be assigned to `shard` there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            wrong = [k for k in keys if expect is not None and expect.get(k) != shard]
            if wrong:
                raise LookupError(wrong[:5])
            out = {}
            for key in keys:
                tensor = f.get_tensor(key)  # a copy out of the memory map
                out[key] = cast(key, tensor) if cast is not None else tensor
            return out
    except LookupError as e:
        raise ValueError(f"{shard} holds keys its index does not assign to it: {e.args[0]}") from None
    except Exception as e:  # safetensors errors differ by version; report them in one form
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a checkpoint?): {e}") from e


def load_strict(model: nn.Module, state_dict: dict[str, Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Load with strict key and shape checks, assigning tensors (a model built on the meta device takes the
    loaded storage instead of a copy). Every mismatch is listed in one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                lines.append(
                    f"  {len(items)} {title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
                )
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"tensors left on the meta device after loading {source}: {still_meta[:10]}")
    return model


def resolve_checkpoint(
    ckpt_dir: str | None,
    *,
    repo_id: str | None,
    files: list[str],
    patterns: list[str],
    default_dir: str,
    flag: str = "--ckpt_dir",
) -> str:
    """The local folder holding `files`.

    A given `ckpt_dir` must already be complete. Otherwise `default_dir` is used, and what it lacks is fetched
    from `repo_id` with `huggingface_hub.snapshot_download`, limited to `patterns` (only the files this run
    needs). Without network access this fails at once with the command that fetches the files elsewhere.
    """
    if ckpt_dir is not None:
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"{flag} {ckpt_dir} is not a directory")
        require_files(ckpt_dir, files, repo_id=repo_id)
        return ckpt_dir
    if all(os.path.isfile(os.path.join(default_dir, f)) for f in files):
        return default_dir
    if repo_id is None:
        require_files(default_dir, files, repo_id=None)
    command = download_command(repo_id, default_dir, include=patterns)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, allow_patterns=patterns, local_dir=default_dir)
    except Exception as e:  # offline, gated repo, no disk space, ...: one message that says what to do
        raise FileNotFoundError(
            f"{default_dir} lacks files of {repo_id} ({', '.join(files)}) and downloading them failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Fetch them where the Hub is "
            f"reachable with:\n  {command}\nor pass {flag} to a folder that holds them."
        ) from e
    require_files(default_dir, files, repo_id=repo_id)
    return default_dir
