"""SGLang test setup. The tests run only where SGLang imports (its own environment, see .ci/run);
elsewhere each module skips itself, so the main suite is unaffected.

SGLang's server cannot start on a CPU machine (no CPU ``sgl_kernel`` on PyPI), but its models
build and run: the session sets this process up as SGLang's single tensor-parallel rank on the CPU
(``ipcv_kernels.sglang.testing.init_process``), loads SGLang's general plugins through their entry
points (``load_plugins``, as every SGLang process does) and builds models through SGLang's own
loader from tiny saved checkpoints that transformers loads too.
"""

from __future__ import annotations

import os

import pytest

# SGLang's vision rotary function is ``torch.compile``d: on the CPU its first call builds inductor
# C++ code (about 40 s on two cores). Eager, it computes the same.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Nothing is downloaded: a checkpoint SGLang cannot find locally fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: the path of a tiny saved ``family`` checkpoint
    (``ipcv_kernels.sglang.testing.build_checkpoint``, seed 0), built once per session."""
    from ipcv_kernels.sglang.testing import build_checkpoint

    paths: dict[str, str] = {}

    def path(family: str) -> str:
        if family not in paths:
            paths[family] = str(build_checkpoint(tmp_path_factory.mktemp(family), family))
        return paths[family]

    return path


@pytest.fixture(scope="session")
def sglang_process(checkpoint):
    """This process as SGLang's one CPU rank, with SGLang's general plugins loaded (ours among
    them, found through its entry point); yields ``load_model(family, overrides)``: an SGLang
    model built by SGLang's loader from the family's checkpoint. Torn down at the session's end."""
    from sglang.srt.plugins import load_plugins

    from ipcv_kernels.sglang.testing import init_process, load_model, shutdown_process

    init_process(checkpoint("qwen2_vl"))
    load_plugins()

    def load(family: str, overrides: dict | None = None):
        return load_model(checkpoint(family), overrides=overrides).eval()

    yield load
    shutdown_process()
