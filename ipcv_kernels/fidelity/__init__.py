"""``python -m ipcv_kernels fidelity``: the fidelity of IPCV's output to the unpruned tower's.

From Python::

    from ipcv_kernels.fidelity import Grid, evaluate_fidelity, load_subject, write_results

    subject = load_subject(preset="qwen2-vl-tiny")  # or model="/path/to/checkpoint", images=...
    result = evaluate_fidelity(subject, Grid(ratios=(0.5,), prune_layers=(2,), as_layers=(2,), neighbors=(4,)))
    write_results(result, Path("out"))

``subjects``: towers (presets, checkpoints), samples and FLOPs; ``evaluate``: methods, grid and
metrics; ``report``: result files; ``cli``: the command line.
"""

from .cli import add_arguments, main, run
from .evaluate import METHODS, FidelityResult, FidelityRow, Grid, default_grid, evaluate_fidelity
from .report import write_results
from .subjects import PRESETS, FidelityError, Sample, Subject, load_subject

__all__ = [
    "METHODS",
    "PRESETS",
    "FidelityError",
    "FidelityResult",
    "FidelityRow",
    "Grid",
    "Sample",
    "Subject",
    "add_arguments",
    "default_grid",
    "evaluate_fidelity",
    "load_subject",
    "main",
    "run",
    "write_results",
]
