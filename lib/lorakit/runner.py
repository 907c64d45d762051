"""How does a notebook run headless, and why did a run fail? `execute` runs one notebook with papermill's
parameter injection (the course's CI, lesson 06's sweep and the benchmarks all run notebooks this way);
`describe_failure` says in one line which cell failed and with what error.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

__all__ = ["execute", "describe_failure"]


def _cell_label(cell) -> str:
    gid = cell.metadata.get("nbgrader", {}).get("grade_id")
    return f" ({gid})" if gid else ""


def execute(path: Path, output: Path, parameters: dict | None = None, *, allow_errors: bool = False,
            timeout: int = 1800, cwd: Path | None = None, quiet_kernel: bool = False) -> nbformat.NotebookNode:
    """Execute a notebook with papermill-style parameter injection; returns the executed notebook.
    With allow_errors the run goes on past failing cells (used for student versions and `check`).
    `quiet_kernel` silences the kernel's own start-up log: a notebook run from inside another notebook (the
    sweep in lesson 06) would otherwise print its warnings there."""
    import papermill as pm
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--IPKernelApp.log_level=CRITICAL"] if quiet_kernel else []
    # The kernel inherits this process's environment as it is: offline where the caller is (tests and CI
    # set HF_HUB_OFFLINE=1), free to download a hub MODEL_ID elsewhere. The embedded model needs no hub.
    # Nothing here changes os.environ, which the threads of a parallel sweep share.
    if not allow_errors:
        pm.execute_notebook(str(path), str(output), parameters=parameters or {}, kernel_name="python3",
                            cwd=str(cwd or path.parent), progress_bar=False, execution_timeout=timeout,
                            extra_arguments=extra)
        return nbformat.read(output, as_version=4)
    from nbclient import NotebookClient
    from papermill.parameterize import parameterize_notebook
    from papermill.iorw import load_notebook_node
    nb = parameterize_notebook(load_notebook_node(str(path)), parameters or {}, kernel_name="python3")
    client = NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=timeout, extra_arguments=extra,
                            resources={"metadata": {"path": str(cwd or path.parent)}})
    client.execute()
    nbformat.write(nb, output)
    return nb


def describe_failure(exc: Exception, executed: Path, label: str = "") -> str:
    """One line on why a notebook run failed: the cell (with its grade_id when it has one) and the error, and
    where the executed copy is; `label` (the lesson, the sweep's run) goes first."""
    from papermill.exceptions import PapermillExecutionError
    head = f"{label}: " if label else ""
    if isinstance(exc, PapermillExecutionError):
        cell_label = ""
        try:  # the executed copy has papermill's banner cell on top: find the cell that errored
            nb = nbformat.read(executed, as_version=4)
            cell = next(c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
            cell_label = _cell_label(cell)
        except Exception:
            pass
        return (f"{head}cell {exc.exec_count or exc.cell_index}{cell_label} failed with "
                f"{exc.ename}: {exc.evalue} (executed copy: {executed})")
    return f"{head}{type(exc).__name__}: {exc}"
