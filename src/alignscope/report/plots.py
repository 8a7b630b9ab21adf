"""One function per figure. Each draws exactly the values in its ``data`` (stored in ``report.json``).

The functions only draw: no means, no CIs, no ranks are computed here (histograms bin stored
per-sample scores, which is how a distribution is drawn, not a new statistic). Every label goes
through :func:`alignscope.report.svg.label` because it may be untrusted text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from alignscope.report.svg import figure, label, model_colour, to_svg

NAN = float("nan")


def _num(values: Sequence[Any]) -> np.ndarray:
    return np.array([NAN if v is None else float(v) for v in values], dtype=float)


def _grouped_bars(ax: Axes, categories: list[str], series: dict[str, dict[str, Any]], *,
                  value: str, low: str | None = None, high: str | None = None, horizontal: bool = False) -> None:
    """Bars per category, one colour per model; optional CI whiskers copied from the tables."""
    n = max(len(series), 1)
    width = 0.8 / n
    positions = np.arange(len(categories), dtype=float)
    for i, (model, rows) in enumerate(series.items()):
        by_cat = {c: j for j, c in enumerate(rows["category"])}
        idx = [by_cat.get(c) for c in categories]
        values = _num([rows[value][j] if j is not None else None for j in idx])
        offset = positions - 0.4 + width * (i + 0.5)
        err = None
        if low and high:
            lo = _num([rows[low][j] if j is not None else None for j in idx])
            hi = _num([rows[high][j] if j is not None else None for j in idx])
            err = np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)])
        bar = ax.barh if horizontal else ax.bar
        kwargs = {"xerr" if horizontal else "yerr": err} if err is not None else {}
        bar(offset, values, width * 0.95, color=model_colour(i), label=label(model), **kwargs)
    ticks = [label(c, 28) for c in categories]
    if horizontal:
        ax.set_yticks(positions, ticks)
        ax.invert_yaxis()
    else:
        ax.set_xticks(positions, ticks, rotation=30, ha="right")


def _legend(ax: Axes, outside: bool = False) -> None:
    if not ax.get_legend_handles_labels()[0]:
        return
    if outside:  # beside the axes, so it never hides a bar
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(frameon=False, fontsize=8)


def training_curves(plot_id: str, data: dict[str, Any]) -> str:
    """Loss, reward margin and reward accuracy against step, one line per trained stage."""
    metrics = data["metrics"]
    with figure(plot_id, 3.3 * len(metrics), 2.8) as fig:
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            for i, (name, series) in enumerate(data["series"].items()):
                if series.get(metric):
                    ax.plot(_num(series[metric]["step"]), _num(series[metric]["value"]), marker=".",
                            color=model_colour(i), label=label(name))
            ax.set_title(label(metric))
            ax.set_xlabel("step")
        _legend(axes[0])
        return to_svg(fig, plot_id)


def adjectives(plot_id: str, data: dict[str, Any]) -> str:
    """Top adjectives by association, one panel per (probe, model), bars coloured by favourability."""
    panels = data["panels"]
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    with figure(plot_id, 4.2 * cols, 0.25 * data["k"] * rows + 1.0) as fig:
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        cmap = matplotlib_cmap()
        for ax, panel in zip(axes, panels):
            fav = _num(panel["favourability"])
            colours = cmap(np.clip((fav + 2.0) / 4.0, 0, 1))
            pos = np.arange(len(panel["adjective"]))
            ax.barh(pos, _num(panel["association"]), color=colours)
            ax.set_yticks(pos, [label(a, 32) for a in panel["adjective"]])
            ax.invert_yaxis()
            ax.set_title(label(f"{panel['model']} · {panel['probe']}"))
            ax.set_xlabel("association (nats)")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        _favourability_bar(fig, axes[: len(panels)], cmap)
        return to_svg(fig, plot_id)


def matplotlib_cmap() -> Any:
    import matplotlib

    return matplotlib.colormaps["RdBu"]


def _favourability_bar(fig: Any, axes: Any, cmap: Any) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(-2, 2), cmap), ax=list(axes), shrink=0.8)
    _vector(bar)
    bar.set_label("favourability (−2 negative … +2 positive)")


def _vector(bar: Any) -> None:
    """Matplotlib rasterises long colour bars to an embedded PNG; keep the figure pure vector."""
    if bar.solids is not None:
        bar.solids.set_rasterized(False)


def covert_overt(plot_id: str, data: dict[str, Any]) -> str:
    """Mean favourability of the top-k adjectives: covert (dialect) next to overt (group named)."""
    models = data["models"]
    with figure(plot_id, 2.8 + 1.3 * len(models), 3.0) as fig:
        ax = fig.subplots()
        pos = np.arange(len(models), dtype=float)
        for j, (kind, colour) in enumerate((("covert", "#D55E00"), ("overt", "#0072B2"))):
            ax.bar(pos - 0.2 + 0.4 * j, _num(data[kind]), 0.38, color=colour, label=kind)
        reference = data.get("all_adjectives")
        if reference is not None:
            ax.axhline(float(reference), color="grey", ls="--", lw=1, label="all adjectives")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(pos, [label(m, 20) for m in models])
        ax.set_ylabel(f"top-{data['k']} favourability")
        _legend(ax, outside=True)
        return to_svg(fig, plot_id)


def stereo_pairs(plot_id: str, data: dict[str, Any]) -> str:
    """Per bias type: % of pairs where the stereotype is preferred, CI whiskers, ideal 50 %."""
    panels = data["panels"]
    tallest = max(len(p["categories"]) for p in panels)
    with figure(plot_id, 4.6 * len(panels), 0.32 * tallest * max(len(p["series"]) for p in panels) + 1.4) as fig:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            _grouped_bars(ax, panel["categories"], panel["series"], value="value", low="ci_low", high="ci_high",
                          horizontal=True)
            ax.axvline(panel["ideal"], color="black", ls="--", lw=1)
            ax.set_xlim(0, 100)
            ax.set_title(label(panel["title"]))
            ax.set_xlabel(label(panel["xlabel"]))
        _legend(axes[0])
        return to_svg(fig, plot_id)


def heatmaps(plot_id: str, data: dict[str, Any]) -> str:
    """Groups × topics agreement, one heatmap per model on a shared 0–100 % colour scale."""
    panels = data["panels"]
    rows = max(len(p["groups"]) for p in panels)
    with figure(plot_id, 5.2 * len(panels) + 0.8, 0.22 * rows + 2.2) as fig:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        mesh = None
        for ax, panel in zip(axes, panels):
            values = np.array([_num(r) for r in panel["values"]], dtype=float).reshape(len(panel["groups"]),
                                                                                       len(panel["topics"]))
            mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap="magma_r", vmin=0, vmax=100)
            ax.set_yticks(np.arange(len(panel["groups"])) + 0.5, [label(g, 22) for g in panel["groups"]], fontsize=7)
            ax.set_xticks(np.arange(len(panel["topics"])) + 0.5, [label(t, 22) for t in panel["topics"]],
                          rotation=60, ha="right", fontsize=7)
            ax.invert_yaxis()
            ax.set_title(label(panel["model"]))
        if mesh is not None:
            bar = fig.colorbar(mesh, ax=list(axes), shrink=0.8)
            _vector(bar)
            bar.set_label("% statements agreed with")
        return to_svg(fig, plot_id)


def toxicity(plot_id: str, data: dict[str, Any]) -> str:
    """Distribution of per-sample toxicity scores, one panel per system prompt, one colour per model."""
    kinds = data["system_kinds"]
    bins = np.linspace(0, 1, 21)
    with figure(plot_id, 3.4 * len(kinds), 2.8) as fig:
        axes = fig.subplots(1, len(kinds), squeeze=False)[0]
        for ax, kind in zip(axes, kinds):
            for i, (model, by_kind) in enumerate(data["scores"].items()):
                values = _num(by_kind.get(kind, []))
                if values.size:
                    ax.hist(values, bins=bins, histtype="step", lw=1.5, color=model_colour(i), label=label(model))
            if data.get("threshold") is not None:
                ax.axvline(float(data["threshold"]), color="black", ls="--", lw=1)
            ax.set_title(label(f"system prompt: {kind}"))
            ax.set_xlabel("toxicity score per sample")
        axes[0].set_ylabel("samples")
        _legend(axes[0])
        return to_svg(fig, plot_id)


def bars(plot_id: str, data: dict[str, Any]) -> str:
    """Grouped bars for per-category tables (leakage per PII type, planted gap per trait)."""
    panels = data["panels"]
    per_panel = max(2.6, 0.3 * max(len(p["categories"]) * len(p["series"]) for p in panels) + 1.2)
    with figure(plot_id, per_panel * len(panels) + 1.2, 3.0) as fig:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            _grouped_bars(ax, panel["categories"], panel["series"], value="value")
            ax.axhline(panel.get("ideal", 0.0), color="black", lw=0.6)
            if panel.get("limits"):
                ax.set_ylim(*panel["limits"])
            ax.set_title(label(panel["title"]))
            ax.set_ylabel(label(panel["ylabel"]))
        _legend(axes[-1], outside=True)
        return to_svg(fig, plot_id)


def recovery(plot_id: str, data: dict[str, Any]) -> str:
    """Each pair's score under each estimator; planted pairs in orange: good estimators put them right."""
    estimators = data["estimators"]
    with figure(plot_id, 7.4, 0.8 * len(estimators) + 0.9) as fig:
        axes = fig.subplots(len(estimators), 1, squeeze=False)[:, 0]
        planted = np.array(data["planted"], dtype=bool)
        for ax, name in zip(axes, estimators):
            scores = _num(data["scores"][name])
            ax.scatter(scores[~planted], np.zeros((~planted).sum()), marker="|", s=200, color="#999999",
                       label="clean pair")
            ax.scatter(scores[planted], np.zeros(planted.sum()), marker="|", s=300, color="#D55E00",
                       label="planted pair")
            ax.set_yticks([0], [label(name, 20)])
            ax.spines["left"].set_visible(False)
        axes[-1].set_xlabel("attribution score (higher = pushes the metric towards 'worse')")
        _legend(axes[0], outside=True)
        return to_svg(fig, plot_id)


def curation(plot_id: str, data: dict[str, Any]) -> str:
    """Metric change against pairs dropped: top-k attributed versus k random, one panel per metric."""
    metrics = data["metrics"]
    with figure(plot_id, 3.8 * len(metrics), 3.0) as fig:
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            for i, (arm, series) in enumerate(data["series"][metric].items()):
                colour = "#D55E00" if arm == "attributed" else model_colour(i + 1)
                k, change = _num(series["k"]), _num(series["change"])
                err = None
                if "ci_low" in series:  # the stored paired CI of each change
                    err = np.vstack([np.clip(change - _num(series["ci_low"]), 0, None),
                                     np.clip(_num(series["ci_high"]) - change, 0, None)])
                ax.errorbar(k, change, yerr=err, marker="o", ls="-" if series["line"] else "none", capsize=3,
                            color=colour, label=label(arm))
            ax.axhline(0, color="black", lw=0.6)
            ax.set_title(label(metric))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("k pairs dropped before re-aligning")
            ax.set_ylabel("metric change")
        _legend(axes[0])
        return to_svg(fig, plot_id)
