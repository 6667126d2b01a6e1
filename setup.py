"""Build script: pure-Python package plus the optional compiled extension from ``csrc/``.

The compiled ops are opt-out and never required: with ``IPCV_SKIP_BUILD=1``, or when torch's C++
extension tooling is not importable at build time, the package installs as pure Python and every
op falls back to its Triton or PyTorch backend. Build with ``--no-build-isolation`` so the
extension compiles against the torch already installed (an isolated build would fetch another).
"""

from setuptools import setup

setup()
