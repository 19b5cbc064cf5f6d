"""The report's figures, drawn beside its analysis.

matplotlib costs about as much as the rest of a report after the imports: importing it, and drawing
the figures. With two cores or more and no other thread in this process (forking a process with
threads can deadlock the child), `FigureDrawing.start()` forks a helper as early as the caller can:
the helper imports matplotlib while this process imports what it analyzes with and analyzes; handed
the analysis (`draw`), it draws the figures in two forked processes while this one runs the tests
and writes the tables; `finish` waits for them. Otherwise `finish` draws them in this process. A
figure's error reaches the caller either way.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dsdtune.atomic import write_bytes
from dsdtune.results import FIGURE_SUFFIX

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HELPER_WORKERS = 2  # the processes that draw: the figures take 0.1-0.2 s each


def save_fig(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(path, buf.getvalue())


@functools.cache
def figure_builders() -> tuple[Callable, ...]:
    """Every figure a report may draw, in order: builders returning (file name without suffix, Figure),
    or None when the study has nothing for that figure. (Imports matplotlib; built once a process.)"""
    from . import figures as F

    def named(name: str, plot: Callable) -> Callable:
        def build(an) -> tuple[str, Figure] | None:
            fig = plot(an)
            return None if fig is None else (name, fig)
        return build

    return (F.plot_factor, named("fig_metric_by_arm", F.plot_arms), named("fig_learning_curves", F.plot_curves),
            named("fig_layer_density", F.plot_layers), named("fig_weight_hist", F.plot_weights),
            named("fig_search", F.plot_search), named("fig_metric_vs_training_flops", F.plot_cost))


_JOB: tuple = ()  # (analysis, out folder): what the helper's forked workers inherit


def _draw(index: int, job: tuple = ()) -> str | None:
    """Build figure `index` for `job` (default: the inherited one) and write its PNG; its name, or None
    when it has nothing to show."""
    an, out = job or _JOB
    built = figure_builders()[index](an)
    if built is None:
        return None
    name, fig = built
    save_fig(fig, out / f"{name}{FIGURE_SUFFIX}")
    return name


def _helper(conn, callers_end) -> None:
    """The helper process: matplotlib first, then the job, then the figures in HELPER_WORKERS processes."""
    global _JOB
    callers_end.close()  # so that the caller's end of the pipe closes when the caller exits
    # The caller answers Ctrl-C; cancel() terminates the helper, which then leaves through the pool's
    # context (stopping its workers too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    # What the parent made is never collected here: no collection copies its pages (copy-on-write)
    gc.freeze()
    try:
        count = len(figure_builders())
        _JOB = pickle.loads(conn.recv_bytes())
        gc.freeze()  # and the same for the workers
        with multiprocessing.get_context("fork").Pool(HELPER_WORKERS) as pool:
            outcome = ("ok", pool.map(_draw, range(count), chunksize=1))
    except EOFError:  # the caller failed before it had an analysis
        return
    except Exception as exc:
        outcome = ("error", exc)
    try:
        conn.send(outcome)
    except (OSError, EOFError):  # the caller is gone
        pass
    except Exception:  # an exception that does not pickle: its words
        conn.send(("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))


class FigureDrawing:
    """`start()` (as early as possible), `draw(an, out)` once the analysis is there, `finish()` for
    {figure name: path}; `cancel()` when the caller fails in between."""

    def __init__(self):
        self.job: tuple = ()
        self.helper = self.conn = self.sender = None

    @classmethod
    def start(cls) -> "FigureDrawing":
        drawing = cls()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores > 1 and threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            drawing.conn, helper_end = context.Pipe()
            drawing.helper = context.Process(target=_helper, args=(helper_end, drawing.conn), name="dsdtune-figures")
            drawing.helper.start()
            helper_end.close()
        return drawing

    def draw(self, an, out: Path) -> None:
        """Hand the analysis to the helper (which draws from now on), or keep it for `finish`."""
        self.job = (an, out)
        if self.conn is not None:
            # Pickled here, before the tests fill the analysis's caches; without the study's spec, which
            # no figure reads (unpickling it would import its pydantic models). Sent from a thread: the
            # pipe holds less than an analysis, and the helper may still be importing matplotlib.
            job = pickle.dumps((dataclasses.replace(an, spec_source=None), out), protocol=pickle.HIGHEST_PROTOCOL)
            self.sender = threading.Thread(target=self._send, args=(self.conn, job), name="dsdtune-figures-job",
                                           daemon=True)
            self.sender.start()

    @staticmethod
    def _send(conn, job: bytes) -> None:
        try:
            conn.send_bytes(job)
        except OSError:  # the helper is gone: finish() says so
            pass

    def cancel(self) -> None:
        """Stop the helper and its workers (when the caller failed before it needed the figures)."""
        self._close(terminate=True)

    def _close(self, terminate: bool) -> None:
        if self.helper is not None:
            if terminate and self.helper.is_alive():
                self.helper.terminate()
            self.helper.join(10)
            if self.helper.is_alive():
                self.helper.kill()
                self.helper.join()
            self.helper = None
        if self.sender is not None:  # its pipe's other end is closed now
            self.sender.join()
            self.sender = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def finish(self) -> dict[str, Path]:
        """{figure name: path} of the figures written, in figure_builders() order."""
        if self.conn is None:
            names = [_draw(i, self.job) for i in range(len(figure_builders()))]
        else:
            try:
                status, value = self.conn.recv()
            except EOFError:
                self.helper.join(10)
                status, value = "error", RuntimeError(f"the figure process ended without drawing "
                                                      f"(exit code {self.helper.exitcode})")
            except BaseException:
                self.cancel()
                raise
            self._close(terminate=status == "error")
            if status == "error":
                raise value
            names = value
        out = self.job[1]
        return {name: out / f"{name}{FIGURE_SUFFIX}" for name in names if name is not None}
