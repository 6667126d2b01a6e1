"""IPCV inside SGLang: adapters for SGLang's own vision encoders and the ``sglang.srt.plugins``
plugin (``register``), on the framework-independent engine (``ipcv_kernels.engine``).

With SGLang and this package installed, ``python -m sglang.launch_server --model-path ...
--json-model-override-args '{"ipcv": {"ratio": 0.65}}'`` builds the model with IPCV in its vision
tower (keys: ``IPCVConfig`` fields; missing ones take the family's recommended setting).
``ipcv_kernels.get_ipcv_patch(model)`` on the model SGLang built (``ModelRunner.model``) returns
the patch (``None`` when unpatched). See ``docs/serving.md``. Each family's SGLang classes and
adapter are in its row of the family table (``ipcv_kernels.families``). Importing this package
does not import SGLang.
"""

from .plugin import apply_from_config, apply_ipcv, check_engine_settings, register, remove_ipcv

__all__ = [
    "apply_from_config",
    "apply_ipcv",
    "check_engine_settings",
    "register",
    "remove_ipcv",
]
