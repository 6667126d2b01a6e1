"""Triton is optional: without it the package imports, registers no "triton" backend, and ``auto``
still resolves every op on every device."""

from __future__ import annotations

import subprocess
import sys

WITHOUT_TRITON = """
import importlib.util, sys

real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "triton" else real_find_spec(name, *a)


class HideTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError("No module named 'triton'")


sys.meta_path.insert(0, HideTriton())
import torch
import ipcv_kernels as ik

assert "triton" not in sys.modules
for op in ("knn", "ngr_reconstruct", "ngr_attention", "select_tokens", "plan"):
    assert "triton" not in ik.ops.backend_names(op), op
    for device in ("cpu", "cuda"):
        ik.ops.backend_for(op, "auto", torch.device(device))
"""


def test_package_imports_and_resolves_without_triton():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
