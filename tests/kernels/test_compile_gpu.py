"""The kernels compile for real GPUs (sm_80, sm_90) without one, through Triton's bundled ptxas.

The interpreter tests cannot see GPU-only failures (tl.dot shape rules, layouts, register limits), so this
lowers the launch configurations the launchers pick all the way to cubin in a subprocess with the
interpreter off (kernels/aot_check.py).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def _has_nvidia_toolchain() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    ptxas = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists()


@pytest.mark.skipif(not _has_nvidia_toolchain(), reason="this Triton build has no bundled ptxas")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_launch_configuration_compiles_for_gpu(arch):
    from diffrt.kernels import aot_check

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "diffrt.kernels.aot_check", "--arch", str(arch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"sm_{arch} ")]
    expected = list(aot_check.configurations(quick=False))
    for kind in ("group_norm", "attention", "adaln", "rms_rope"):
        assert sum(line.split()[1] == kind for line in lines) == sum(item[0] == kind for item in expected), kind
    norms = [line for line in lines if line.split()[1] in ("adaln", "rms_rope")]
    assert norms and all("spill bytes 0" in line for line in norms)  # the row kernels keep to registers
