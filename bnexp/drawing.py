"""Drawing figures in other processes, so that drawing costs the command little wall time.
Importing this module does not import matplotlib.

- `Forked`: a task run in a forked child process, its return value (or exception) fetched
  later. `bnexp.plots.plot_results` draws the sweep figure in one while it draws the training
  curves itself, so the two figures take the two cores.
- `Drawer`: a process forked when a sweep starts. At the lowest CPU priority it imports
  matplotlib and draws a throw-away figure (fonts, the mathtext parser), which takes about a
  second of CPU that would otherwise come after training: it runs on a core left idle while
  the data loads and after the first of the two groups has finished, and yields to training
  otherwise. Then it draws the sweep's figures when asked.

Both children leave Ctrl-C to the parent, which stops them with SIGTERM: they stop as on an
interrupt, removing the temporary file of a figure half written (figures are written only by
atomic replacement). They die with the parent however it ends (`bnexp.executor`'s
PR_SET_PDEATHSIG); after a SIGKILL of the parent a temporary file may remain, which the next
plot removes. Figures are the same bytes whichever process draws them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path

from bnexp.errors import OutputError
from bnexp.executor import (
    _die_with_parent,
    _picklable,
    block_stop_signals,
    restore_signals,
    signals_held,
    unblock_stop_signals,
)

#: Niceness of the drawer while it warms up: it runs only on a core training leaves idle.
WARM_UP_NICENESS = 19


def can_fork() -> bool:
    """Whether figures may be drawn in forked processes: fork exists and 2+ CPUs are ours."""
    if not hasattr(os, "fork") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cpus or 1) > 1


#: Seconds a child gets to stop after SIGTERM (it removes its temporary file) before SIGKILL.
STOP_GRACE = 2.0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _become_helper(parent_pid: int) -> None:
    """A child's set-up: die with the parent, leave Ctrl-C to it, and stop on SIGTERM as on an
    interrupt, so that the figure being written leaves no temporary file behind."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    unblock_stop_signals()


def _run_child(task, parent_pid: int, read_end: int, write_end: int) -> None:
    """The child of `Forked`: run the task, send the outcome, exit without clean-up."""
    try:
        _become_helper(parent_pid)
        os.close(read_end)
        outcome = ("ok", task())
    except BaseException as exc:  # every failure goes to the parent
        outcome = ("error", _picklable(exc) if isinstance(exc, Exception) else None)
    try:
        with os.fdopen(write_end, "wb") as f:
            pickle.dump(outcome, f)
    finally:
        os._exit(0)  # never the parent's atexit handlers, buffers or finally blocks


class Forked:
    """`task()` run in a forked child process; `result()` returns its value or raises its
    exception (the value and exception must pickle). `kill()` ends it early."""

    def __init__(self, task):
        parent_pid = os.getpid()
        read_end, write_end = os.pipe()
        with signals_held():  # see executor.signals_held: no signal lost in the fork
            previous = block_stop_signals()
            pid = os.fork()
            if pid == 0:  # the child keeps them blocked until its handlers are set
                _run_child(task, parent_pid, read_end, write_end)  # never returns
            restore_signals(previous)
        os.close(write_end)
        self.pid, self.read_end = pid, read_end

    def result(self):
        """The task's return value; its exception re-raised; OutputError if the child died."""
        with os.fdopen(self.read_end, "rb") as f:
            message = f.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if not message:
            raise OutputError(
                f"the process drawing a figure died ({_how(status)}); run `bnexp plot` again"
            )
        kind, value = pickle.loads(message)
        if kind == "error":
            raise value if value is not None else KeyboardInterrupt()
        return value

    def kill(self) -> None:
        """Stop the child now, if it still runs (when the parent stops early): SIGTERM, so that
        it removes its temporary file, then SIGKILL after STOP_GRACE seconds."""
        if self.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.005)
        with contextlib.suppress(OSError):
            os.close(self.read_end)
        self.pid = None


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


# --- the drawer -----------------------------------------------------------------------------


def _serve(conn, parent_pid: int) -> None:
    """The drawer: warm up at the lowest priority, then draw what is asked, one request at a
    time: ("plot", out) -> ("ok", paths) or ("error", exception); None, EOF or SIGTERM ends it."""
    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM: `Drawer.close`
        _become_helper(parent_pid)
        _serve_requests(conn)


def _serve_requests(conn) -> None:
    """`_serve` once the drawer is set up."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, WARM_UP_NICENESS)
    from bnexp import plots

    plots.warm_up()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        # Drawing is now on the critical path: back to the parent's priority where allowed.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
        try:
            conn.send(("ok", plots.plot_results(message[1])))
        except Exception as exc:
            conn.send(("error", _picklable(exc)))


class Drawer:
    """A process that gets matplotlib ready while a sweep trains, then draws its figures.

    Use as a context manager; `plot_results(out)` is `bnexp.plots.plot_results(out)` run in
    it (PNG only, default axes).
    """

    def __init__(self):
        context = multiprocessing.get_context("fork")
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child_end, os.getpid()), name="bnexp-drawer", daemon=True
        )
        with signals_held():  # see executor.signals_held: no signal lost in the fork
            previous = block_stop_signals()
            try:
                self.process.start()
            finally:  # only the parent returns from start()
                restore_signals(previous)
        child_end.close()

    def plot_results(self, out: str | Path) -> list[Path]:
        """Draw OUT's figures in the drawer; its exception re-raised here."""
        try:
            self.conn.send(("plot", str(out)))
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=1.0)
            raise OutputError(
                f"the process drawing the figures died (exit {self.process.exitcode}); "
                f"draw them with `bnexp plot {out}`"
            ) from None
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """End the drawer at once (SIGTERM: a figure half drawn leaves no temporary file; one
        still warming up is not waited for); SIGKILL after STOP_GRACE seconds."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=STOP_GRACE)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def __enter__(self) -> Drawer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
