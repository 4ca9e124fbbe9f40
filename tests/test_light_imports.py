"""`--help` and a bad flag answer at once: each sample script parses and checks its flags before it imports
torch, transformers or diffusers (they take seconds to import; torch alone ~2 s here). Checked on
sys.modules in a fresh interpreter, not by timing (README "Bad input" has the measured wall times)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "diffusers")
# Run the script as `python SCRIPT ARGV...` would, then report which heavy modules it imported.
PROBE = f"""
import runpy, sys
script, argv = sys.argv[1], sys.argv[2:]
sys.argv = [script, *argv]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
print("HEAVY", ",".join(m for m in {HEAVY!r} if m in sys.modules), "EXIT", code, file=sys.stderr)
"""

# (script, argv, exit status, a piece of the error line): --help, an argparse error, an unknown
# --METHOD.FIELD, and checks that need no torch (a frame count, a cache field, a layout without torchrun).
CASES = [
    ("sample_wan.py", ["--help"], 0, None),
    ("sample_wan.py", ["--task", "t2v-7B"], 2, "invalid choice"),
    ("sample_wan.py", ["--teacache.bogus", "1"], 2, "TeaCacheConfig has no field 'bogus'"),
    ("sample_wan.py", ["--task", "tiny", "--frame_num", "4"], 2, "--frame_num must be 4n+1"),
    ("sample_wan.py", ["--task", "tiny", "--cache", "teacache", "--teacache.rel_l1_thresh", "-1"], 2, ">= 0"),
    ("sample_wan.py", ["--task", "tiny", "--ulysses_size", "2"], 2, "torchrun"),
    ("sample_hunyuan.py", ["--help"], 0, None),
    ("sample_hunyuan.py", ["--precision", "fp8"], 2, "invalid choice"),
    ("sample_hunyuan.py", ["--video-length", "4"], 2, "--video-length must be 4n+1"),
    ("sample_opensora.py", ["--help"], 0, None),
    ("sample_opensora.py", ["--resolution", "4k"], 2, "invalid choice"),
    ("sample_opensora.py", ["--num-frames", "5"], 2, "takes 1 frame"),
]


@pytest.mark.parametrize("script, argv, status, message", CASES)
def test_parsing_and_flag_errors_import_no_heavy_library(script, argv, status, message):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, os.path.join(ROOT, script), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"HEAVY  EXIT {status}", done.stderr[-2000:]
    if message is not None:  # one `error:` line, nothing else on stderr
        assert len(lines) == 2 and lines[0].startswith("error: ") and message in lines[0], lines
    else:
        assert "usage:" in done.stdout


def test_task_tables_name_configs_that_exist(tmp_path):
    # The tables name their model configs (looked up after parsing); each name resolves to the release's.
    import sample_hunyuan
    import sample_wan
    from models.hunyuan import HUNYUAN_CONFIGS
    from models.wan import WAN_CONFIGS, WAN_I2V_14B
    from models.wan_clip import CLIP_TINY, CLIP_VIT_H_14
    from models.wan_t5 import UMT5_TINY, UMT5_XXL, WAN_NEGATIVE_PROMPT
    from models.wan_vae import WAN_VAE_CONFIG, WAN_VAE_TINY

    tasks = sample_wan.TASKS
    assert tasks["t2v-1.3B"].dit is WAN_CONFIGS["t2v-1.3B"] and tasks["t2v-14B"].dit is WAN_CONFIGS["t2v-14B"]
    assert tasks["i2v-14B"].dit is WAN_I2V_14B and sample_wan.I2V_480P.dit is WAN_I2V_14B
    assert tasks["tiny"].dit is None and tasks["i2v-tiny"].dit is None  # read from config.json
    assert (tasks["t2v-1.3B"].t5, tasks["t2v-1.3B"].vae, tasks["t2v-1.3B"].clip) == (
        UMT5_XXL,
        WAN_VAE_CONFIG,
        None,
    )
    assert (tasks["tiny"].t5, tasks["tiny"].vae) == (UMT5_TINY, WAN_VAE_TINY)
    assert (tasks["i2v-14B"].clip, tasks["i2v-tiny"].clip) == (CLIP_VIT_H_14, CLIP_TINY)
    for name, negative in [
        ("t2v-1.3B", WAN_NEGATIVE_PROMPT),
        ("i2v-14B", "镜头晃动，" + WAN_NEGATIVE_PROMPT),
    ]:
        flags = ["--task", name, "--device", "cpu"] + (
            ["--image", _png(tmp_path)] if name.startswith("i2v") else []
        )
        args = sample_wan.parse_args(flags)
        sample_wan.check_args(args)
        assert args.negative_prompt == negative and args.device == "cpu"
    assert sample_hunyuan.TASKS["t2v-720p"].dit is HUNYUAN_CONFIGS["t2v-720p"]


def _png(folder) -> str:
    from PIL import Image

    path = os.path.join(folder, "first.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(path)
    return path
