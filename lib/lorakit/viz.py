"""Plots and widgets shared by the lessons.

`explore(draw, **controls)` gives a learner a knob to play with: an ipywidgets control panel when widgets
can render, and always a static figure drawn with the default values first, so the lesson reads the same in
a browser without widget support, in an exported HTML file, or when CI executes it.
Lesson-specific figures live next to their lessons' code, added below as small named functions.
"""

from __future__ import annotations

import os

__all__ = ["LAB_LABELS", "SHARDING_STYLES", "widgets_available", "explore", "lora_shapes", "memory_bars",
           "plot_study", "sharding_curves"]


def widgets_available() -> bool:
    """ipywidgets is installed and we are inside a Jupyter kernel (not plain Python, not papermill with
    LORAKIT_STATIC=1)."""
    if os.environ.get("LORAKIT_STATIC") == "1":
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def explore(draw, **controls):
    """Draw `draw(**defaults)` once as a static figure, then offer `controls` as widgets.

    Each control is an ipywidgets-style abbreviation: a list of options, a (min, max, step) tuple, or a
    widget instance. The panel is displayed here; nothing is returned, so ending a cell with this call
    does not display the panel a second time."""
    defaults = {k: _default(v) for k, v in controls.items()}
    import matplotlib.pyplot as plt
    draw(**defaults)
    plt.show()
    if not widgets_available():
        print("(Widgets are not available here: change the values in the call above and re-run the cell.)")
        return
    import ipywidgets as w
    from IPython.display import display

    def _draw(**kw):
        draw(**kw)
        plt.show()

    display(w.interactive(_draw, {"manual": False}, **controls))


def _default(control):
    if hasattr(control, "value"):
        return control.value
    if isinstance(control, (list, tuple)) and control and not isinstance(control[0], (int, float)):
        first = control[0]
        return first[1] if isinstance(first, tuple) else first
    if isinstance(control, tuple):
        lo, hi = control[0], control[1]
        return type(lo)((lo + hi) / 2) if isinstance(lo, int) else (lo + hi) / 2
    if isinstance(control, list):
        return control[0]
    return control


# --------------------------------------------------------------------------------------------------
# Lesson 02 (LoRA)
# --------------------------------------------------------------------------------------------------

def lora_shapes(d_out: int = 5000, d_in: int = 4000, r: int = 8, ax=None):
    """Lesson 02: the frozen weight W (d_out x d_in) beside LoRA's B (d_out x r) and A (r x d_in), drawn
    to scale (a thin matrix gets at least a hairline so you can see it), with their parameter counts."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.6))
    side = max(d_out, d_in)
    w, h = d_in / side, d_out / side
    thin = max(r / side, 0.012)
    full, lora = d_out * d_in, r * (d_in + d_out)
    ax.add_patch(Rectangle((0, 0), w, h, color="#9aa5b1"))
    ax.text(w / 2, h / 2, f"W (frozen)\n{d_out:,} x {d_in:,}\n{full:,} numbers", ha="center", va="center")
    ax.text(w + 0.12, h / 2, "+", fontsize=22, ha="center", va="center")
    x0 = w + 0.25
    ax.add_patch(Rectangle((x0, 0), thin, h, color="#dd8452"))
    ax.text(x0 + thin / 2, -0.06, f"B\n{d_out:,} x {r}", ha="center", va="top")
    ax.add_patch(Rectangle((x0 + thin + 0.05, h - thin), w, thin, color="#4c72b0"))
    ax.text(x0 + thin + 0.05 + w / 2, h - thin - 0.04, f"A: {r} x {d_in:,}", ha="center", va="top")
    ax.text(x0 + thin + 0.05 + w / 2, h / 2 - 0.1, f"B A has rank <= {r}\nA + B: {lora:,} numbers\n"
            f"= {lora / full:.2%} of W", ha="center", va="center")
    ax.set_xlim(-0.02, x0 + thin + 0.1 + w)
    ax.set_ylim(-0.25, h + 0.05)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"LoRA update of a {d_out:,} x {d_in:,} weight at rank r = {r}")
    return ax


# ------------------------------------------------------------------------------ lesson 01: memory bars

MEMORY_COLORS = {"weights": "#4c72b0", "quantization constants": "#8172b3", "gradients": "#dd8452",
                 "fp32 master weights": "#c44e52", "optimizer states": "#937860", "adapters": "#55a868",
                 "activations": "#8c8c8c", "gathered layers": "#64b5cd"}


def memory_bars(estimates: dict, gpus=(16, 24, 48, 80), ax=None, title: str | None = None):
    """Stacked horizontal bars, one per `lorakit.memory.MemoryEstimate` (label -> estimate), a segment per
    part, with dashed lines at common GPU sizes (GB). Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 1.4 + 0.6 * len(estimates)))
    labels = list(estimates)
    drawn = set()
    for y, label in enumerate(labels):
        left = 0.0
        for part, nbytes in estimates[label].parts.items():
            gb = nbytes / 1e9
            ax.barh(y, gb, left=left, color=MEMORY_COLORS.get(part, "#cccccc"),
                    label=part if part not in drawn else None)
            drawn.add(part)
            left += gb
        ax.text(left, y, f" {left:,.1f} GB", va="center", fontsize=9)
    top = max(e.gb for e in estimates.values())
    for g in gpus:
        if g <= top * 1.3:
            ax.axvline(g, color="black", ls="--", lw=0.8, alpha=0.6)
            ax.text(g, 0.98, f" {g} GB GPU", transform=ax.get_xaxis_transform(), ha="left", va="top",
                    fontsize=8, rotation=90, alpha=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("GB (1e9 bytes)")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.figure.tight_layout()
    return ax


# --------------------------------------------------------------------------------------------------
# Lesson 06 (the LoRA vs QLoRA lab)
# --------------------------------------------------------------------------------------------------

LAB_LABELS = {"exact_match": "held-out exact match", "answer_loss": "held-out answer loss (nats/token)",
              "trainable_params": "trainable parameters", "training_bytes": "training state (bytes, measured)",
              "activation_bytes": "saved activations (bytes)", "model_bytes": "model bytes (weights + adapters)",
              "step_seconds": "seconds per step", "r": "rank r", "alpha": "alpha", "dropout": "dropout",
              "scaling": "scaling (alpha / r)"}


def plot_study(summary, study: str, x: str = "r", y: str = "exact_match", hue: str | None = None, ax=None):
    """Lesson 06: one study of a lab summary (`lorakit.lab.summarize`): the mean of `y` against `x` over the
    seeds, with a bar from the worst to the best seed, one line per value of `hue` (default: the field that
    varies besides `x`, if any). Configurations without a successful run are left out. Returns the Axes."""
    import math

    import matplotlib.pyplot as plt

    rows = summary[(summary["study"] == study) & (summary["n"] > 0)].copy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.4))
    if rows.empty:
        ax.set_title(f"{study}: no successful runs")
        return ax
    rows["scaling"] = [a / (math.sqrt(r) if rs else r) for a, r, rs in zip(rows.alpha, rows.r, rows.use_rslora)]
    if hue is None:
        varying = [c for c in ("method", "alpha", "use_rslora", "target_modules", "dropout")
                   if c != x and rows[c].nunique() > 1]
        hue = varying[0] if varying else None
    numeric_x = rows[x].dtype.kind in "if"
    for label, g in (rows.groupby(hue, sort=False) if hue else [("", rows)]):
        g = g.sort_values(x) if numeric_x else g
        xs = g[x].astype(float) if numeric_x else g[x].astype(str)
        if f"{y}_min" in g:  # the seed range: from the worst run to the best
            yerr = [g[y] - g[f"{y}_min"], g[f"{y}_max"] - g[y]]
        else:
            yerr = None
        ax.errorbar(xs, g[y], yerr=yerr, marker="o", capsize=3, label=f"{hue}={label}" if hue else None)
    if numeric_x and x in ("r", "trainable_params") and rows[x].max() / max(rows[x].min(), 1e-9) > 8:
        ax.set_xscale("log", base=2)
        if x == "r":
            ticks = sorted(rows[x].unique())
            ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    if y == "exact_match":
        ax.set_ylim(0, 1)
    ax.set(xlabel=LAB_LABELS.get(x, x), ylabel=LAB_LABELS.get(y, y), title=f"{study} (bars: seed range)")
    if hue:
        ax.legend(fontsize=8)


# --------------------------------------------------------------------------- lesson 08: sharded memory

SHARDING_STYLES = {"DDP": ("none", False, "#8c8c8c"), "ZeRO-1": ("zero1", False, "#dd8452"),
                   "ZeRO-2 / SHARD_GRAD_OP": ("zero2", False, "#55a868"), "ZeRO-3 / FULL_SHARD": ("zero3", False, "#4c72b0"),
                   "ZeRO-3 + CPU offload": ("zero3", True, "#8172b3")}


def sharding_curves(cfg, method: str, devices=(1, 2, 4, 8, 16, 32, 64), gpus=(24, 80), ax=None, **estimate_kw):
    """Lesson 08: per-device memory (`lorakit.memory.estimate`) against the number of devices, one line per
    strategy: DDP, ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, dashed lines at GPU sizes (GB).
    QLoRA under ZeRO-3 is estimated with its 4-bit weights stored in bf16 (what FSDP needs)."""
    import matplotlib.pyplot as plt

    from lorakit import memory
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4))
    for label, (sharding, offload, color) in SHARDING_STYLES.items():
        kw = dict(estimate_kw, sharding=sharding, cpu_offload=offload)
        if method == "qlora" and sharding == "zero3":
            kw["quant_storage"] = "bf16"
        gb = [memory.estimate(cfg, method, world_size=n, **kw).gb for n in devices]
        ax.plot(devices, gb, marker="o", ms=3, color=color, label=label, ls="--" if offload else "-")
    for g in gpus:
        ax.axhline(g, color="black", lw=0.8, ls=":")
        ax.text(devices[-1], g, f" {g} GB GPU", va="bottom", ha="right", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="devices (data-parallel processes)", ylabel="GB per device",
           title=f"{cfg if isinstance(cfg, str) else 'model'}, {method}: memory of one device")
    ax.set_xticks(list(devices), [str(d) for d in devices])
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.figure.tight_layout()
    return ax
