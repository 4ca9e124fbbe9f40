"""HunyuanVideo's two text encoders, encoding as the official `hyvideo/text_encoder` and `inference.py`.

1. LLM: the language model of LLaVA-Llama-3-8B (a `LlamaModel`, hidden 4096). Each prompt is put into the
   official video template, tokenised to 256 + crop_start tokens (right padding, truncation) and encoded with
   the attention mask. We take the hidden states *after layer L-3* (`hidden_states[-(2 + 1)]`: skip 2 layers,
   and no final RMSNorm, `apply_final_norm=False`). The first crop_start rows (BOS and the template's
   instruction) are cropped from states and mask, leaving the prompt's 256 rows.
2. CLIP-L text model: the prompt alone, 77 tokens padded to max length, `pooler_output` (the EOS token's
   state after the final LayerNorm, no projection).

crop_start. The official code crops a fixed 95 rows for the video template (36 for the image template, unused
here): the number of tokens the Llama-3 tokenizer gives BOS + the template text before `{}`. We keep the
constant and check it against the tokenizer at construction (`template_crop_start`), so that another
tokenizer cannot silently crop the wrong rows; `crop_start=None` derives it from the tokenizer instead (tests
use tiny tokenizers). The official tokenizer gives 95 (checked offline with Llama-3's BPE `tokenizer.json`).

Weights: the diffusers-format repo hunyuanvideo-community/HunyuanVideo, folders text_encoder/ (LlamaModel,
fp16), tokenizer/, text_encoder_2/ (CLIPTextModel, fp16) and tokenizer_2/, loaded with transformers from a
local folder.

Letters: B prompts, L tokens, D hidden size of the LLM (4096), C hidden size of CLIP (768).
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, CLIPTextModel

HUB_REPO = "hunyuanvideo-community/HunyuanVideo"

# The official PROMPT_TEMPLATE_ENCODE_VIDEO ("dit-llm-encode-video", hyvideo/constants.py), verbatim.
PROMPT_TEMPLATE_ENCODE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
CROP_START_VIDEO = 95  # official crop_start of the video template: BOS + 94 template tokens (Llama-3)
TEXT_LEN = 256  # official --text-len: LLM rows kept after the crop, the DiT's text sequence length
TEXT_LEN_2 = 77  # official --text-len-2: CLIP's context length
HIDDEN_STATE_SKIP_LAYER = 2  # official --hidden-state-skip-layer: hidden_states[-(2 + 1)]

# Folder -> a file that must be in it (diffusers layout of HUB_REPO) and what it is, for the error message.
_FOLDERS = {
    "text_encoder": ("config.json", "LLaVA-Llama-3-8B language model"),
    "tokenizer": ("tokenizer_config.json", "its tokenizer"),
    "text_encoder_2": ("config.json", "CLIP-L text model"),
    "tokenizer_2": ("tokenizer_config.json", "CLIP tokenizer"),
}


def template_crop_start(tokenizer, template: str = PROMPT_TEMPLATE_ENCODE_VIDEO) -> int:
    """Number of leading tokens (special tokens such as BOS included) that `template` puts before the prompt.

    That is the official crop_start if the tokenizer splits the text before `{}` alone as it does inside a
    full prompt, which is checked here with a probe prompt (a tokenizer that merges the template's last
    characters with the prompt would make any fixed crop wrong)."""
    if template.count("{}") != 1:
        raise ValueError("the prompt template must contain exactly one '{}' placeholder for the prompt")
    prefix = tokenizer(template.split("{}")[0]).input_ids
    probe = tokenizer(template.format("A cat walks on the grass.")).input_ids
    if probe[: len(prefix)] != prefix:
        raise ValueError(
            "the tokenizer splits the template text before '{}' differently when a prompt follows it, "
            "so no fixed crop_start removes exactly the template; use the official Llama-3 tokenizer"
        )
    return len(prefix)


class HunyuanTextEncoders:
    """LLM + CLIP encoders of HunyuanVideo. `__call__(prompts)` -> (text_states, text_mask, text_states_2)."""

    def __init__(
        self,
        llm,
        tokenizer,
        clip: CLIPTextModel,
        tokenizer_2,
        *,
        device: str | torch.device,
        llm_device: str | torch.device | None = None,
        clip_device: str | torch.device | None = None,
        offload: bool = False,
        crop_start: int | None = CROP_START_VIDEO,
    ):
        if tokenizer.pad_token is None:
            raise ValueError("the LLM tokenizer has no pad token; the official encoding pads to max length")
        derived = template_crop_start(tokenizer)
        if crop_start is not None and crop_start != derived:
            raise ValueError(
                f"crop_start={crop_start} but this tokenizer puts {derived} tokens before the prompt; use "
                f"the official tokenizer from {HUB_REPO} (tokenizer/), or pass crop_start=None to derive it"
            )
        self.llm, self.tokenizer, self.clip, self.tokenizer_2 = llm, tokenizer, clip, tokenizer_2
        self.tokenizer.padding_side = "right"  # as the official load_tokenizer: the crop needs it
        self.crop_start = derived
        self.device = torch.device(device)
        self.llm_device = torch.device(llm_device or device)
        self.clip_device = torch.device(clip_device or device)
        self.offload = offload

    @classmethod
    def from_pretrained(
        cls,
        root_dir: str,
        *,
        device: str | torch.device,
        dtype: torch.dtype = torch.float16,
        llm_device: str | torch.device | None = None,
        clip_device: str | torch.device | None = None,
        offload: bool = False,
        crop_start: int | None = CROP_START_VIDEO,
    ) -> HunyuanTextEncoders:
        """Load from a local copy of HUB_REPO's text folders. With `offload`, both models wait on the CPU and
        each visits its device only while it encodes (the 8B LLM takes ~16 GB in fp16 that the DiT needs)."""
        missing = [
            sub for sub, (f, _) in _FOLDERS.items() if not os.path.isfile(os.path.join(root_dir, sub, f))
        ]
        if missing:
            what = ", ".join(f"{sub}/ ({_FOLDERS[sub][1]})" for sub in missing)
            include = " ".join(f"'{sub}/*'" for sub in missing)
            raise FileNotFoundError(
                f"{root_dir} lacks {what} from the Hub repo {HUB_REPO}; fetch with: "
                f"hf download {HUB_REPO} --include {include} --local-dir {root_dir}"
            )
        with open(os.path.join(root_dir, "text_encoder", "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if model_type != "llama":
            raise ValueError(f"{root_dir}/text_encoder holds a {model_type} model, not the Llama LM")
        # dtype= (transformers >= 4.56) loads fp16 directly; the .to(dtype) below covers older versions.
        llm = AutoModel.from_pretrained(os.path.join(root_dir, "text_encoder"), dtype=dtype)
        clip = CLIPTextModel.from_pretrained(os.path.join(root_dir, "text_encoder_2"), dtype=dtype)
        home = "cpu" if offload else None
        return cls(
            llm.requires_grad_(False).eval().to(home or llm_device or device, dtype),
            AutoTokenizer.from_pretrained(os.path.join(root_dir, "tokenizer"), padding_side="right"),
            clip.requires_grad_(False).eval().to(home or clip_device or device, dtype),
            AutoTokenizer.from_pretrained(os.path.join(root_dir, "tokenizer_2")),
            device=device,
            llm_device=llm_device,
            clip_device=clip_device,
            offload=offload,
            crop_start=crop_start,
        )

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """text_states [B, 256, D] and text_states_2 [B, C] in the models' dtype, text_mask [B, 256] int64,
        all on `device`."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings (wrap a single prompt in a list)")
        text_states, text_mask = self.encode_llm(prompts)
        return text_states, text_mask, self.encode_clip(prompts)

    @torch.no_grad()
    def encode_llm(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The official LLM encoding; see the module docstring."""
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE_ENCODE_VIDEO.format(p) for p in prompts],
            max_length=TEXT_LEN + self.crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        llm = self.llm.to(self.llm_device)
        hidden_states = llm(
            input_ids=tokens.input_ids.to(self.llm_device),  # [B, L]
            attention_mask=tokens.attention_mask.to(self.llm_device),  # [B, L]
            output_hidden_states=True,
        ).hidden_states  # (embeddings, layer 0 out, ..., RMSNorm(layer L-1 out)), each [B, L, D]
        states = hidden_states[-(HIDDEN_STATE_SKIP_LAYER + 1)]  # [B, L, D] layer L-3's output, no final norm
        states = states[:, self.crop_start :].to(self.device)  # [B, 256, D]
        mask = tokens.attention_mask[:, self.crop_start :].to(self.device)  # [B, 256]
        if self.offload:
            llm.to("cpu")
        return states, mask

    @torch.no_grad()
    def encode_clip(self, prompts: list[str]) -> Tensor:
        """The official CLIP encoding; see the module docstring."""
        tokens = self.tokenizer_2(
            prompts, max_length=TEXT_LEN_2, padding="max_length", truncation=True, return_tensors="pt"
        )
        clip = self.clip.to(self.clip_device)
        # The official code passes the mask, diffusers does not: the same result, as pads follow EOS (causal).
        pooled = clip(
            input_ids=tokens.input_ids.to(self.clip_device),  # [B, 77]
            attention_mask=tokens.attention_mask.to(self.clip_device),  # [B, 77]
        ).pooler_output  # [B, C]
        if self.offload:
            clip.to("cpu")
        return pooled.to(self.device)
