"""SGLang server end to end: ``python benchmarks/bench_sglang.py`` where SGLang is installed (a GPU).

Starts two SGLang servers (``python -m sglang.launch_server``) on one checkpoint, one plain and one
with ``--json-model-override-args '{"ipcv": {...}}'`` (the plugin, ``ipcv_kernels.sglang``), and
times, interleaved round by round, the time to first token of streamed OpenAI-API chat requests
(``/v1/chat/completions``, ``max_tokens=1``), each with a new random image (SGLang caches
encodings by image content, so every request encodes anew). The model is a Qwen2-VL with a preset's
vision tower (default ``qwen2-vl-7b``, the 7B tower) and the tests' tiny language model, saved with
seeded random weights (``ipcv_kernels.sglang.testing.build_checkpoint``): the encoder's share of a
request is then as large as it gets, and nothing is downloaded.

Results: ``sglang_<name>.json`` (arguments, versions, every sample) and ``.md`` (median time to
first token per image size, plain and with IPCV, and the speedup) in ``--out`` (default
``./ipcv_results/sglang``). Both servers' logs go there too. Has not run on the CPU machine where it
was written (SGLang's server needs a GPU there); ``benchmarks/gpu_suite.sh``'s ``sglang`` step runs
it where SGLang imports.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ipcv_kernels._help_text import help_summary


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` in pixels."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an image size is HxW in pixels, got {text!r}") from None
    if height < 28 or width < 28:
        raise argparse.ArgumentTypeError(f"an image size must be at least 28x28, got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=help_summary(__doc__))
    parser.add_argument("--preset", default="qwen2-vl-7b", help="a Qwen2-VL preset's vision tower (qwen2-vl-*)")
    parser.add_argument("--cases", nargs="+", type=parse_size, default=[(448, 448), (896, 896)], help="image sizes HxW")
    parser.add_argument("--rounds", type=int, default=10, help="timed requests per case and server")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per case and server first")
    parser.add_argument("--ipcv", type=json.loads, default={}, help="IPCVConfig fields as JSON ({}: recommended)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--port", type=int, default=31000, help="the plain server's port; IPCV's is the next")
    parser.add_argument("--mem-fraction-static", type=float, default=0.35, help="each server's share of the GPU")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to come up")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a saved checkpoint (default: build one)")
    parser.add_argument("--out", type=Path, default=Path("ipcv_results/sglang"))
    parser.add_argument("--name", default="gpu")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot run, naming the option."""
    from ipcv_kernels import IPCVConfig
    from ipcv_kernels.families import presets

    found = presets().get(args.preset)
    if found is None or found[0].id != "qwen2_vl":
        raise SystemExit(f"--preset must be a Qwen2-VL preset ({[n for n in presets() if n.startswith('qwen2-vl')]})")
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--rounds must be >= 1 and --warmup >= 0")
    if not isinstance(args.ipcv, dict):
        raise SystemExit("--ipcv must be a JSON object of IPCVConfig fields")
    IPCVConfig(**{**found[0].recommended, **args.ipcv})  # ValueError / TypeError naming the field
    if not 0.0 < args.mem_fraction_static < 0.5:
        raise SystemExit("--mem-fraction-static must be in (0, 0.5): two servers share the GPU")


def build(args: argparse.Namespace, directory: Path) -> Path:
    """The benchmark checkpoint: the preset's tower, the tiny language model with room for the
    largest case's tokens, images up to the largest case kept at their size."""
    from ipcv_kernels.families import presets
    from ipcv_kernels.sglang.testing import build_checkpoint

    vision = dict(presets()[args.preset][1].vision)
    largest = max(height * width for height, width in args.cases)
    return build_checkpoint(
        directory / "checkpoint",
        "qwen2_vl",
        vision=vision,
        text={"max_position_embeddings": 4 * 8192},
        max_pixels=largest,
    )


def start_server(args: argparse.Namespace, checkpoint: Path, port: int, ipcv: dict | None, log: Path) -> Any:
    command = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(checkpoint), "--port", str(port),
        "--host", "127.0.0.1", "--dtype", args.dtype, "--mem-fraction-static", str(args.mem_fraction_static),
        "--chat-template", "qwen2-vl", "--disable-radix-cache",
    ]  # fmt: skip
    if ipcv is not None:
        command += ["--json-model-override-args", json.dumps({"ipcv": ipcv})]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(server: Any, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-40:])
            raise SystemExit(f"the server on port {port} exited with {server.returncode}:\n{tail}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"the server on port {port} was not up after {timeout:.0f} s (log: {log})")


def random_png(height: int, width: int, rng: np.random.Generator) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def time_to_first_token(port: int, image: str, timeout: float) -> float:
    """Seconds from sending a streamed chat request with ``image`` to its first streamed chunk."""
    body = json.dumps(
        {
            "model": "default",
            "stream": True,
            "max_tokens": 1,
            "temperature": 0.0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                        {"type": "text", "text": "w5 w6 w7"},
                    ],
                }
            ],
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"the server on port {port} answered {response.status}: {response.read()[:2000]!r}")
    first = None
    for line in response:
        if line.startswith(b"data:") and first is None:
            first = time.perf_counter() - start
        if line.strip() == b"data: [DONE]":
            break
    connection.close()
    if first is None:
        raise SystemExit(f"the server on port {port} streamed no chunk")
    return first


def report(args: argparse.Namespace, samples: dict[str, dict[str, list[float]]], versions: dict[str, str]) -> str:
    lines = [
        f"# SGLang server, time to first token ({args.name})",
        "",
        f"Preset `{args.preset}` tower, tiny language model, {args.dtype}, IPCV {args.ipcv or 'recommended'}; "
        f"{args.rounds} interleaved requests per case and server, median. Versions: {versions}.",
        "",
        "| image | plain (ms) | IPCV (ms) | speedup |",
        "|---|---|---|---|",
    ]
    for case, by_server in samples.items():
        plain, pruned = statistics.median(by_server["plain"]), statistics.median(by_server["ipcv"])
        lines.append(f"| {case} | {plain * 1e3:.1f} | {pruned * 1e3:.1f} | {plain / pruned:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import sglang
    import torch

    import ipcv_kernels.sglang  # noqa: F401  (the plugin must import where the servers run)

    args.out.mkdir(parents=True, exist_ok=True)
    versions = {"sglang": sglang.__version__, "torch": torch.__version__, "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or build(args, Path(scratch))
        ports = {"plain": args.port, "ipcv": args.port + 1}
        servers = {
            name: start_server(args, checkpoint, port, None if name == "plain" else args.ipcv, args.out / f"{name}.log")
            for name, port in ports.items()
        }
        try:
            for name, port in ports.items():
                wait_ready(servers[name], port, args.startup_timeout, args.out / f"{name}.log")
            rng = np.random.default_rng(0)
            samples: dict[str, dict[str, list[float]]] = {}
            for height, width in args.cases:
                case = f"{height}x{width}"
                samples[case] = {"plain": [], "ipcv": []}
                for round_index in range(args.warmup + args.rounds):
                    for name, port in ports.items():  # interleaved: drift hits both alike
                        seconds = time_to_first_token(port, random_png(height, width, rng), args.request_timeout)
                        if round_index >= args.warmup:
                            samples[case][name].append(seconds)
                print(case, {name: f"{statistics.median(v) * 1e3:.1f} ms" for name, v in samples[case].items()})
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
    stem = args.out / f"sglang_{args.name}"
    stem.with_suffix(".json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "versions": versions, "samples": samples})
    )
    text = report(args, samples, versions)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
