"""OpenSora 1.2 text conditioning: prompt scores, caption cleaning and the T5-v1.1-XXL encoder.

The official pipeline (scripts/inference.py) turns a prompt into the DiT's `y` in three steps, kept here in
order: append " aesthetic score: 6.5." -> `text_preprocessing` (the training-time caption cleaning, applied
twice) -> T5 encoder over 300 padded tokens. The null (CFG) caption is NOT T5 of "": it is the DiT's learned
`y_embedder.y_embedding`, so it lives in the DiT, not here.

Shape legend: B prompts, L tokens (model_max_length = 300), D T5 hidden size (4096).
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import urllib.parse
from html.entities import html5
from html.parser import HTMLParser

import ftfy
import torch
from torch import Tensor
from transformers import AutoTokenizer, T5EncoderModel

from models.loading import download_command

T5_REPO_ID = "DeepFloyd/t5-v1_1-xxl"
DEFAULT_AES = 6.5  # configs/opensora-v1-2/inference/sample.py


def append_scores(prompt: str, aes: float | None) -> str:
    """Official append_score_to_prompts for the aesthetic score; a prompt that already states one is kept."""
    if aes is None or "aesthetic score:" in prompt:
        return prompt
    return f"{prompt} aesthetic score: {aes:.1f}."


#################################################################################
#                                Caption cleaning                               #
#################################################################################
# The captions the model was trained on were web alt-texts, cleaned by PixArt's `clean_caption`; prompts must
# go through the same cleaning to look like them (lower case, no URLs/HTML/ids/file names, one kind of dash
# and quote). This is our own implementation of that behaviour; tests/data/opensora/caption_cleaning.json
# holds the official outputs it reproduces. Each step below is one official step, in the official order.


class _HTMLText(HTMLParser):
    """The text of an HTML fragment as BeautifulSoup(markup, "html.parser").text gives it: character data and
    CDATA with entities resolved; no comments, declarations or processing instructions; nothing inside
    script/style/template/rt/rp (bs4 stores those as string types that .text leaves out); and, as bs4 does, a
    text node of ASCII whitespace only becomes one space (one newline if it has one) outside pre/textarea."""

    HIDDEN = {"script", "style", "template", "rt", "rp"}
    KEEP_SPACE = {"pre", "textarea"}
    # bs4's empty-element tags: never left open, so their end tags close nothing
    VOID = set(
        "area base basefont bgsound br col command embed frame hr image img input isindex keygen link"
        " menuitem meta nextid param source spacer track wbr".split()
    )

    def __init__(self):
        super().__init__(convert_charrefs=False)  # entities are resolved below, like bs4 does
        self.parts: list[str] = []
        self.node: list[str] = []  # data of the current text node (up to the next markup)
        self.open: list[str] = []  # open elements, innermost last

    def end_node(self, cdata: bool = False):
        text, self.node = "".join(self.node), []
        if text and not self.KEEP_SPACE.intersection(self.open) and not text.strip(" \n\t\f\r"):
            text = "\n" if "\n" in text else " "
        # bs4 keeps CDATA visible even inside hidden elements
        if text and (cdata or not self.HIDDEN.intersection(self.open)):
            self.parts.append(text)

    def handle_starttag(self, tag, attrs):
        self.end_node()  # a node belongs to the element it ends in
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        self.end_node()
        if tag in self.open:  # close it and whatever is still open inside it; a stray end tag does nothing
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag) :]

    def handle_data(self, data):
        self.node.append(data)

    def handle_entityref(self, name):
        # Unknown names stay literal text, without the ';' that the parser consumed (as bs4).
        self.node.append(html5.get(name + ";", html5.get(name, "&" + name)))

    def handle_charref(self, name):
        self.node.append(_numeric_char(int(name[1:], 16) if name[0] in "xX" else int(name)))

    def handle_comment(self, data):
        self.end_node()

    handle_decl = handle_pi = handle_comment

    def unknown_decl(self, data):
        self.end_node()
        if data.upper().startswith("CDATA["):
            self.node.append(data[len("CDATA[") :])
            self.end_node(cdata=True)


def _numeric_char(code: int) -> str:
    """&#code; as bs4 resolves it (HTML5): U+FFFD if impossible, cp1252 for 0x80-0x9F where it is defined
    (text saved as cp1252 then escaped), otherwise the code point itself, controls included."""
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    if 0x80 <= code <= 0x9F:
        try:
            return bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    return chr(code)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    parser.end_node()
    return "".join(parser.parts)


_TLDS = "com|co|ru|net|org|edu|gov|it"
# a scheme ("http:", "https:", or the typo "www:") with what follows it, or a bare domain with its path
_URLS = [
    re.compile(rf"\b(?:{scheme}(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+\.(?:{_TLDS})[\w/-]*\b/?(?!@))")
    for scheme in ("https?:", "www:")
]
_DASH_CODES = [0x2D, 0x58A, 0x5BE, 0x1400, 0x1806, *range(0x2010, 0x2016), 0x2E17, 0x2E1A, 0x2E3A, 0x2E3B]
_DASH_CODES += [0x2E40, 0x301C, 0x3030, 0x30A0, 0xFE31, 0xFE32, 0xFE58, 0xFE63, 0xFF0D]
_DASHES = re.compile("[" + re.escape("".join(map(chr, _DASH_CODES))) + "]+")
_BAD_PUNCT = re.compile("[" + re.escape("#®•©™&@·º½¾¿¡§~()[]{}|\\/*") + "]+")
_FILE_EXTS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# (pattern, replacement) applied in order, before the HTML is stripped ...
_BEFORE_HTML = [(r"<person>", "person"), (_URLS[0], ""), (_URLS[1], "")]
# ... and between HTML stripping and ftfy:
_AFTER_HTML = [
    (r"@\w+", ""),  # @nicknames
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes .. unified ideographs (U+31C0-U+9FFF, one contiguous span)
    (_DASHES, "-"),  # every kind of dash -> "-"
    (r"[`´«»“”¨]", '"'),  # one kind of double quote
    (r"[‘’]", "'"),  # one kind of single quote
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids / times
    (r"\\n", " "),  # a literal backslash-n left in scraped text
    (r"#\d{1,3}\b", ""),  # "#123"
    (r"#\d{5,}\b", ""),  # "#12345..."
    (r"\b\d{6,}\b", ""),  # long numbers
    (rf"\S+\.(?:{_FILE_EXTS})", ""),  # file names
    (r"[\"']{2,}", '"'),  # runs of quotes -> one
    (r"\.{2,}", " "),  # ellipses
    (_BAD_PUNCT, " "),  # ***SALE***, #tag, (x), a/b, ...
    (r"\s+\.\s+", " "),  # lone dots
]
# ... and after ftfy: product codes, shop spam, sizes, then spacing and stray edge punctuation.
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_EXTS})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),  # a space after , . / glued to the next word
    (r"\s+", " "),
    (r"(?s)^[\"'](.+)[\"']$", r"\1"),  # a caption wrapped in quotes
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
]


def _substitute(text: str, rules) -> str:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text


def clean_caption(caption: str) -> str:
    """One pass of the official (PixArt) caption cleaning."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _substitute(html_to_text(_substitute(text, _BEFORE_HTML)), _AFTER_HTML)
    if text.count("-") + text.count("_") > 3:  # this-is-my-cute-cat -> words
        text = text.replace("-", " ").replace("_", " ")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _substitute(text, _AFTER_FTFY).strip()


def text_preprocessing(text: str) -> str:
    """The official cleaning: `clean_caption` twice ("the exact text cleaning as in the training stage")."""
    return clean_caption(clean_caption(text))


def prepare_prompts(prompts: list[str], aes: float | None = DEFAULT_AES) -> list[str]:
    """What the tokenizer sees: the score appended first, then the cleaning (the official order)."""
    return [text_preprocessing(append_scores(p, aes)) for p in prompts]


#################################################################################
#                                 T5 encoder                                    #
#################################################################################


class OpenSoraTextEncoder:
    """T5-v1.1-XXL encoder (transformers) with the official tokenisation: 300 tokens, padded, with a mask."""

    def __init__(self, tokenizer, model: T5EncoderModel, model_max_length: int = 300):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(
        cls,
        t5_dir: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        model_max_length: int = 300,
    ) -> OpenSoraTextEncoder:
        """Load a local copy of DeepFloyd/t5-v1_1-xxl (config, weights and tokenizer files).

        Args:
            t5_dir: local directory (never a hub id: nothing is downloaded here).
            device: where the encoder runs.
            dtype: the official encoder runs in fp32 (`T5Encoder(dtype=torch.float)`).
            model_max_length: tokens per prompt; OpenSora 1.2 uses 300.
        """
        _check_t5_dir(t5_dir)
        tokenizer = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
        model = T5EncoderModel.from_pretrained(t5_dir, dtype=dtype, local_files_only=True)
        return cls(tokenizer, model.to(device), model_max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], *, aes: float | None = DEFAULT_AES) -> tuple[Tensor, Tensor]:
        """Prompts -> (y [B, 1, L, D], mask [B, L] int64, 1 on real tokens incl. the final </s>)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        device = self.model.device
        tokens = self.tokenizer(
            prepare_prompts(prompts, aes),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = tokens["attention_mask"].to(device)  # [B, L]
        y = self.model(
            input_ids=tokens["input_ids"].to(device), attention_mask=mask
        ).last_hidden_state  # [B, L, D]
        return y[:, None], mask  # [B, 1, L, D], [B, L]


def _check_t5_dir(t5_dir: str) -> None:
    """Clear errors before transformers tries (and, offline, fails) to reach the hub."""
    fetch = download_command(T5_REPO_ID, t5_dir)
    if not os.path.isdir(t5_dir):
        raise FileNotFoundError(f"T5 directory {t5_dir} does not exist; fetch it with: {fetch}")
    files = set(os.listdir(t5_dir))
    checks = {
        "config.json": "config.json" in files,
        "the weights (*.safetensors or pytorch_model*.bin)": any(
            f.endswith((".safetensors", ".bin")) for f in files
        ),
        "a tokenizer (spiece.model or tokenizer.json)": bool(files & {"spiece.model", "tokenizer.json"}),
    }
    missing = [what for what, ok in checks.items() if not ok]
    if missing:
        raise FileNotFoundError(
            f"{t5_dir} lacks {', '.join(missing)} of {T5_REPO_ID}; fetch them with: {fetch}"
        )
    # The DeepFloyd repo ships only spiece.model; transformers 5 converts it with protobuf, and without
    # protobuf it fails with an unrelated tiktoken error.
    if "tokenizer.json" not in files and not _has_protobuf():
        raise ImportError(
            f"reading {t5_dir}/spiece.model needs protobuf and sentencepiece: pip install protobuf"
        )


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no "google" namespace package at all
        return False
