"""Sweep figures for `arvae report --plot OPTION`: test metrics against the swept option,
one line per model and metric (PixelVAE Fig. 4a: NLL against the number of PixelCNN layers,
PixelVAE and PixelCNN; AGAVE Figs. 4 and 5: bits/dim of both decoders, KL and reconstructions
against λ and against y's colour levels), and the -ELBO's breakdown into reconstruction and
KL (PixelVAE Fig. 4b)."""

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402

from .report import hparam  # noqa: E402

Series = dict[str, list[tuple[object, float]]]  # label -> (option value, metric) per run


def series(reports: list[dict], option: str, metric: str, group: str | None = None) -> Series:
    """``test/<metric>`` against the model option ``option`` (dotted key), per model class
    (and per value of the option ``group``, if given); runs without that metric or option are
    left out. ``kl`` is the sum over latent levels."""
    found: Series = defaultdict(list)
    for report in reports:
        x = hparam(report["hparams"], option, None)
        metrics = report["metrics"]
        if metric == "kl":
            kls = [v for k, v in metrics.items() if k.startswith("test/kl/")]
            y = sum(kls) if kls else None
        else:
            y = metrics.get(f"test/{metric}")
        label = report["model"]
        if group is not None:
            label += f" {group.rsplit('.', 1)[-1]}={hparam(report['hparams'], group, None)}"
        if x is not None and y is not None:
            found[label].append((x, float(y)))
    return {label: sorted(points, key=lambda p: _order(p[0])) for label, points in found.items()}


def _order(x) -> tuple:
    return (0, float(x), "") if isinstance(x, (int, float)) else (1, 0.0, str(x))


def _draw(ax, points: list[tuple[object, float]], label: str, **style) -> None:
    """Every run as a point and a line through the mean of the runs at each option value."""
    xs = [x for x, _ in points]
    categorical = not all(isinstance(x, (int, float)) for x in xs)
    at = {x: i for i, x in enumerate(dict.fromkeys(xs))} if categorical else None
    pos = [at[x] if categorical else x for x in xs]
    means: dict = defaultdict(list)
    for p, (_, y) in zip(pos, points, strict=True):
        means[p].append(y)
    (line,) = ax.plot(list(means), [sum(v) / len(v) for v in means.values()], label=label, **style)
    ax.scatter(pos, [y for _, y in points], color=line.get_color(), s=12)
    if categorical:
        ax.set_xticks(list(at.values()), [str(x) for x in at], rotation=30, ha="right")


def plot_metric(
    reports: list[dict], option: str, metrics: list[str], path: Path, group: str | None = None
) -> Path | None:
    """Each ``test/<metric>`` against ``option``, one line per model and metric (AGAVE Fig. 4:
    both decoders' bits/dim and the KL and reconstruction terms against λ); None if no run
    has the option and one of them. Metrics in bits/dim and in nats share no axis: give one
    kind."""
    data = {m: series(reports, option, m, group) for m in metrics}
    data = {m: d for m, d in data.items() if d}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    models = {label for d in data.values() for label in d}
    for metric, found in data.items():
        for model, points in found.items():
            label = metric if len(models) == 1 else f"{model} {metric}"
            _draw(ax, points, label, marker="o")
    unit = "bits/dim" if all(m.startswith("bpd") for m in data) else "nats per image"
    name = f"test/{next(iter(data))}" if len(data) == 1 else "test metrics"
    ax.set(xlabel=option, ylabel=f"{name} ({unit})", title=f"{name} vs {option}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_breakdown(reports: list[dict], option: str, path: Path) -> Path | None:
    """Reconstruction and KL (nats per image) against ``option`` for the latent models."""
    recon, kl = series(reports, option, "recon"), series(reports, option, "kl")
    models = [m for m in recon if m in kl]
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    for model in models:
        (line,) = ax.plot([], [])  # one colour per model, solid recon and dashed KL
        colour = line.get_color()
        _draw(ax, recon[model], f"{model} reconstruction", color=colour, marker="o")
        _draw(ax, kl[model], f"{model} KL", color=colour, marker="s", linestyle="--")
    ax.set(xlabel=option, ylabel="nats per image", title=f"-ELBO breakdown vs {option}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(
    reports: list[dict], option: str, metrics: list[str], folder: Path, group: str | None = None
) -> list[Path]:
    """The sweep's figures in ``folder``: ``<metric>_vs_<option>.png`` (``metrics_vs_...``
    for several metrics in one plot) and, with latent models, ``breakdown_vs_<option>.png``."""
    name = option.replace(".", "_").replace("/", "_")
    stem = metrics[0].replace("/", "_") if len(metrics) == 1 else "metrics"
    drawn = [
        plot_metric(reports, option, metrics, folder / f"{stem}_vs_{name}.png", group),
        plot_breakdown(reports, option, folder / f"breakdown_vs_{name}.png"),
    ]
    return [p for p in drawn if p is not None]
