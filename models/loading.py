"""Reading official checkpoint files and loading them strictly; clear errors for missing or broken files.

Finding and checking files (resolve_checkpoint, require_files, check_checkpoint_files, safetensors_header,
checkpoint_shapes, check_shapes) reads no tensor, so the sample scripts run these checks before any model is
loaded.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

# safetensors dtype names -> bytes per element
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                       "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
                       "U64": 8}  # fmt: skip


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
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a checkpoint?): {_reason(e)}") from e


def _reason(e: Exception) -> str:
    """The informative line of a loading error (torch's refused-pickle message is ~15 lines of advice)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    key = [line for line in lines if "Unsupported global" in line or "not an allowed global" in line]
    return (key or lines or [type(e).__name__])[0]


def safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a .safetensors header, read without loading a tensor. A file cut short, a
    garbled header or a tensor whose byte range disagrees with its shape raises ValueError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({n}-byte header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: the safetensors header is not JSON (a damaged file?)") from None
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            count = _SAFETENSORS_DTYPES[dtype] * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: bad header entry for {name!r}: {info}") from None
        if stop - begin != count:
            raise ValueError(f"{path}: {name} {list(shape)} {dtype} needs {count} bytes, not {stop - begin}")
        out[name], end = (dtype, shape), max(end, stop)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return out


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a .safetensors file, or of every shard a .safetensors.index.json lists, from the
    headers alone (no tensor is read): what check_shapes compares a meta-device model against."""
    if not path.endswith(".index.json"):
        return {k: shape for k, (_, shape) in safetensors_header(path).items()}
    with open(path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(weight_map.values())):
        shapes.update(checkpoint_shapes(os.path.join(os.path.dirname(path), shard)))
    return shapes


def check_checkpoint_files(folder: str, files: Iterable[str]) -> None:
    """Read the headers of `files` in `folder` before anything loads: safetensors headers and sizes (and the
    shards an index lists), JSON that parses, .pt/.pth files in torch's zip format whose pickle needs no
    global that `torch.load(weights_only=True)` would refuse. ValueError names the file and the fault."""
    for name in files:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            safetensors_header(path)
        elif name.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from None
            if name.endswith(".safetensors.index.json"):
                shards = sorted(set(data.get("weight_map", {}).values())) if isinstance(data, dict) else []
                if not shards:
                    raise ValueError(f"{path} has no weight_map")
                require_files(os.path.dirname(path), shards, repo_id=None)
                for shard in shards:
                    safetensors_header(os.path.join(os.path.dirname(path), shard))
        elif name.endswith((".pt", ".pth")):
            check_torch_file(path)


def check_torch_file(path: str) -> None:
    """A .pt/.pth file that `torch.load(weights_only=True)` will read: torch's zip format, complete, and no
    pickled global outside torch's allow-list (one that would run code is refused here, unread)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # a legacy (torch < 1.6) pickle starts with the PROTO opcode
                raise ValueError(f"{path} is truncated or not a torch checkpoint (no zip directory)")
        return
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # a damaged zip member, a pickle cut short
        raise ValueError(f"cannot read checkpoint {path} (corrupt?): {_reason(e)}") from None
    if unsafe:
        raise ValueError(
            f"{path} pickles {', '.join(unsafe[:3])}, which torch.load(weights_only=True) refuses to run: "
            "not a plain weights file; re-save it as a state dict of tensors"
        )


def load_sharded_safetensors(
    ckpt_dir: str,
    name: str = "diffusion_pytorch_model",
    *,
    cast: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """`name`.safetensors, or the shards listed by `name`.safetensors.index.json (diffusers' layout).

    Tensors are read one at a time and `cast(key, tensor)` (e.g. to bf16, a copy) is applied to each as it
    is read, each from a memory map of its own that is closed right after: host memory peaks at the cast
    state dict plus the one tensor being read, never at the whole file-dtype state next to the cast one.
    """
    files, weight_map = safetensors_files(ckpt_dir, name)
    state_dict: dict[str, Tensor] = {}
    for path, shard in files:
        state_dict.update(_read_safetensors(path, cast, expect=weight_map, shard=shard))
    _check_index_complete(weight_map, state_dict)
    return state_dict


def safetensors_files(ckpt_dir: str, name: str = "diffusion_pytorch_model") -> tuple[list, dict | None]:
    """[(path, shard name)] of `name`.safetensors or of the shards its index lists (in name order), and the
    index's weight map (None for a single file)."""
    single = os.path.join(ckpt_dir, f"{name}.safetensors")
    index = os.path.join(ckpt_dir, f"{name}.safetensors.index.json")
    if os.path.isfile(single):
        return [(single, "")], None
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{ckpt_dir} has neither {name}.safetensors nor {name}.safetensors.index.json"
        )
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    return [(os.path.join(ckpt_dir, s), s) for s in sorted(set(weight_map.values()))], weight_map


def stream_safetensors_slices(
    ckpt_dir: str, name: str = "diffusion_pytorch_model"
) -> Iterator[tuple[str, object]]:
    """(key, slice) for every tensor of `name`.safetensors or its shards, one tensor's memory map open at a
    time (use the slice before taking the next). A safetensors slice reads only the rows it is indexed with
    (`sl[a:b]`: rows a..b of dim 0, a tensor in the file's dtype), so a caller that needs part of each tensor
    (FSDP: this rank's 1/N) touches only that part of the file. Same checks as load_sharded_safetensors."""
    files, weight_map = safetensors_files(ckpt_dir, name)
    seen = set()
    for path, shard in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            f = safe_open(path, framework="pt")
        except Exception as e:  # safetensors errors differ by version; report them in one form
            raise ValueError(f"cannot read checkpoint {path} (corrupt or not a checkpoint?): {e}") from e
        with f:
            keys = list(f.keys())
            wrong = [k for k in keys if weight_map is not None and weight_map.get(k) != shard]
            if wrong:
                raise ValueError(f"{shard} holds keys its index does not assign to it: {wrong[:5]}")
            for key in keys:
                seen.add(key)
                with safe_open(path, framework="pt") as one:  # one map per tensor (see _read_safetensors)
                    yield key, one.get_slice(key)
    _check_index_complete(weight_map, seen)


def _check_index_complete(weight_map: dict | None, loaded) -> None:
    absent = sorted(set(weight_map or ()) - set(loaded))
    if absent:
        raise ValueError(f"the index lists keys that no shard holds: {absent[:5]}")


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
                if cast is None:
                    out[key] = f.get_tensor(key)  # views of the file's one memory map
                    continue
                # With a cast, a memory map of its own per tensor, closed once the cast copy exists: the file
                # pages just read leave this process's resident memory with it. (One map per file keeps every
                # page read so far resident until the file is done: one whole shard on top of the model.)
                with safe_open(path, framework="pt") as one:
                    out[key] = cast(key, one.get_tensor(key))
            return out
    except LookupError as e:
        raise ValueError(f"{shard} holds keys its index does not assign to it: {e.args[0]}") from None
    except Exception as e:  # safetensors errors differ by version; report them in one form
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a checkpoint?): {e}") from e


def check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], *, source: str = "checkpoint") -> None:
    """Strict key and shape check of `shapes` ({key: shape}, e.g. from safetensors_header, so it can run
    before any weight is read) against `model` (built on the meta device). Every mismatch in one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [
        f"{k}: {tuple(shapes[k])} in {source}, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(
                    f"  {len(items)} {title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
                )
        raise ValueError("\n".join(lines))


def load_strict(model: nn.Module, state_dict: dict[str, Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Load with strict key and shape checks, assigning tensors (a model built on the meta device takes the
    loaded storage instead of a copy). Every mismatch is listed in one error."""
    check_shapes(model, {k: tuple(v.shape) for k, v in state_dict.items()}, source=source)
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
