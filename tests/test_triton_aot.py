"""Every Triton kernel compiles ahead of time for Hopper (sm_90), no GPU needed.

Runs in a subprocess without TRITON_INTERPRET: the interpreter replaces kernels at decoration time.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "denseclip_fast.ops.triton.aot", "--arch", "90"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    labels = {line.split(":")[0].split()[0] for line in lines}
    assert {"score_fwd", "score_bwd_visual", "attn_fwd", "attn_delta", "attn_dkdv", "attn_dq"} <= labels, lines
