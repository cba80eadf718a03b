"""`evaluate` modules shipped with the package, so metrics load on clusters without Hub access.

Each folder ``<name>/<name>.py`` holds one `evaluate.Metric` whose `_compute` calls the pure functions of
`protoquant_hf.metrics`; ``evaluate.load(<that folder>)`` loads it from disk, never from the Hub.
"""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the shipped modules, sorted."""
    return sorted(folder.name for folder in _ROOT.iterdir() if (folder / f"{folder.name}.py").is_file())


def evaluate_module_path(name: str) -> str:
    """The local folder of the shipped module `name`, for ``evaluate.load(...)``."""
    if name not in available_metrics():
        raise ValueError(f"Unknown metric {name!r}; the shipped metrics are: {', '.join(available_metrics())}.")
    return str(_ROOT / name)


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of the shipped module `name` (works offline). `kwargs` go to `evaluate.load`
    (e.g. ``experiment_id``, ``keep_in_memory``, ``num_process`` / ``process_id``)."""
    path = evaluate_module_path(name)
    import evaluate  # here, not at the top: importing evaluate takes seconds and the pure metrics never need it

    return evaluate.load(path, **kwargs)


__all__ = ["available_metrics", "evaluate_module_path", "load_metric"]
