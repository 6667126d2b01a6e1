"""The serial oracle of concurrent calls: a patched model is as re-entrant as the unpatched one, so
calls made from several threads at once must give exactly what the same calls give one after the
other."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

ROUNDS = 6


def last_state(output: object) -> torch.Tensor:
    """A tower's output tensor (``last_hidden_state`` where it returns a model output)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output


def hammer(calls: list[Callable[[], object]], rounds: int = ROUNDS) -> None:
    """Run every call serially, then ``rounds`` times each from its own thread, all at once; every
    concurrent output must equal its serial one exactly."""
    with torch.no_grad():
        expected = [last_state(call()) for call in calls]
    barrier = threading.Barrier(len(calls))
    results: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(calls))}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(rounds):
                    results[index].append(last_state(calls[index]()))
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, outputs in results.items():
        assert len(outputs) == rounds
        for output in outputs:
            assert torch.equal(output, expected[index])
