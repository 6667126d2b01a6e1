"""IPCV inside vLLM: adapters for vLLM's own vision encoders and the ``vllm.general_plugins``
plugin (``register``), on the framework-independent engine (``ipcv_kernels.engine``).

With vLLM and this package installed, ``vllm.LLM(model=path, hf_overrides={"ipcv": {"ratio":
0.65}})`` builds the model with IPCV in its vision tower (keys: ``IPCVConfig`` fields; missing
ones take the family's recommended setting). ``ipcv_kernels.get_ipcv_patch(model)`` on the model
that ``LLM.apply_model`` hands its function returns the patch (``None`` when unpatched). See
``docs/serving.md``. Each family's vLLM classes and adapter are in its row of the family table
(``ipcv_kernels.families``). Importing this package does not import vLLM.
"""

from .plugin import apply_ipcv, check_engine_settings, register, remove_ipcv

__all__ = [
    "apply_ipcv",
    "check_engine_settings",
    "register",
    "remove_ipcv",
]
