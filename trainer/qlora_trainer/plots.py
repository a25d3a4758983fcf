"""``loss.png``: train and eval loss by step (top) and the learning rate (bottom), written with the adapter.

matplotlib with the Agg backend (no display); its config and font cache go to
``MPLCONFIGDIR`` (``cli.prepare_environment`` points it under ``QLORA_CACHE_DIR``: the
pod's root filesystem is read-only). The figure is :data:`SIZE_PX` pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Size of ``loss.png`` in pixels (width, height).
SIZE_PX = (1000, 700)
_DPI = 100
TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#d62728"
LR_COLOR = "#2ca02c"


def series(history: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "eval": [(step, eval_loss)], "lr": [(step, learning_rate)]}`` from a
    Trainer ``log_history`` (the final summary entry, without ``loss``, is skipped)."""
    out: dict[str, list[tuple[int, float]]] = {"train": [], "eval": [], "lr": []}
    for entry in history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        for key, name in (("loss", "train"), ("eval_loss", "eval"), ("learning_rate", "lr")):
            value = entry.get(key)
            if isinstance(value, (int, float)):
                out[name].append((step, float(value)))
    return out


def loss_plot(history: Iterable[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Draw ``history`` (see :func:`series`) into the PNG ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    data = series(history)
    fig = Figure(figsize=(SIZE_PX[0] / _DPI, SIZE_PX[1] / _DPI), dpi=_DPI)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, color, marker in (("train", TRAIN_COLOR, "."), ("eval", EVAL_COLOR, "o")):
        if data[name]:
            xs, ys = zip(*data[name])
            loss_ax.plot(xs, ys, color=color, marker=marker, linewidth=2, label=f"{name} loss")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(loc="upper right")
    loss_ax.set_title(title or "training")
    if data["lr"]:
        xs, ys = zip(*data["lr"])
        lr_ax.plot(xs, ys, color=LR_COLOR, linewidth=2)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=_DPI)
    return Path(path)
