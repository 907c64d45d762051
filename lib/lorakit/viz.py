"""Plots and widgets shared by the lessons.

`explore(draw, **controls)` gives a learner a knob to play with: an ipywidgets control panel when widgets
can render, and always a static figure drawn with the default values first, so the lesson reads the same in
a browser without widget support, in an exported HTML file, or when CI executes it.
Lesson-specific figures live next to their lessons' code, added below as small named functions.
"""

from __future__ import annotations

import os


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
    widget instance. Returns the ipywidgets `interactive` object, or None when widgets can't render."""
    defaults = {k: _default(v) for k, v in controls.items()}
    import matplotlib.pyplot as plt
    draw(**defaults)
    plt.show()
    if not widgets_available():
        print("(Widgets are not available here: change the values in the call above and re-run the cell.)")
        return None
    import ipywidgets as w
    from IPython.display import display

    def _draw(**kw):
        draw(**kw)
        plt.show()

    ui = w.interactive(_draw, {"manual": False}, **controls)
    display(ui)
    return ui


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
