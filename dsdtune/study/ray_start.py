"""A local Ray instance started on a thread while the driver finishes setting up the study.

Starting Ray (GCS, raylet, dashboard, idle workers) takes seconds, most of them spent waiting for
those processes; the driver meanwhile imports Tune, claims the study's folders and opens its
console. Only a local instance starts here (`--address` joins a running cluster at once), and only
once every check of the study has passed: a refused study never starts Ray.

What Ray says while it starts (its log records, its warnings and the first output its processes
forward) is held back, then handed in order to whoever shows Ray's output once the study's console
is open (`replay`): the console's log file, or the terminal with --verbose. If the driver fails
before it takes the instance over, `abandon` stops it again.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from typing import Optional

RAY_LOGGER = "ray"


def set_ray_environment() -> None:
    """What a study sets in the environment before it imports Ray or Tune, or starts Ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray starts: its ports ask for a token
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # signals are ours (see run.SignalState)
    # Tune's default loggers write every result three times (JSON, CSV, TensorBoard); the JSON one is
    # what the result tables are read from, so it is the one a study adds (see run._run_tuner).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


class LocalRayStart:
    def __init__(self, dashboard_host: str, num_cpus: Optional[int], runtime_env: Optional[dict] = None):
        self._args = (dashboard_host, num_cpus, runtime_env)
        self._records: list[logging.LogRecord] = []
        self._worker_output: list[dict] = []
        self._warnings: list[tuple] = []
        self._saved_handlers: Optional[tuple[list, bool]] = None
        self._saved_printer = None
        self._saved_showwarning = None
        self._context = None
        self._error: Optional[BaseException] = None
        self.waited = False  # wait() or abandon() took the instance over
        self._ready = threading.Event()
        set_ray_environment()
        self._thread = threading.Thread(target=self._start, name="dsdtune-ray-start", daemon=True)
        self._thread.start()

    @staticmethod
    def wanted(address: Optional[str]) -> bool:
        """Only a local instance that is not running yet (a notebook or a test may hold one)."""
        ray = sys.modules.get("ray")
        return not address and not (ray is not None and ray.is_initialized())

    # ---- on the thread ----
    def _start(self) -> None:
        try:
            import ray
            from ray._private import ray_constants

            self._hold_ray_output()
            # Ray's single-machine mode: its node address becomes 127.0.0.1, so every port a local study
            # opens (GCS, raylet, workers, dashboard agent, metrics) is bound to loopback, not to the network.
            # Ray reads the switch from the environment (its child processes) and from this constant.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
            dashboard_host, num_cpus, runtime_env = self._args
            self._context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                                     dashboard_host=dashboard_host, runtime_env=runtime_env)
            self._hold_worker_output()
        except BaseException as err:  # handed to the driver's thread by wait()
            self._error = err
            return
        finally:
            self._ready.set()
        # Ray's processes die with the thread that started them (Linux's parent-death signal is
        # per thread), so this one lives as long as the instance does.
        while ray.is_initialized():
            time.sleep(0.5)

    def _hold_ray_output(self) -> None:
        logger = logging.getLogger(RAY_LOGGER)
        self._saved_handlers = (list(logger.handlers), logger.propagate)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_Holder(self._records))
        logger.propagate = False
        thread = threading.get_ident()
        self._saved_showwarning = shown = warnings.showwarning

        def hold_warning(message, category, filename, lineno, file=None, line=None):
            if threading.get_ident() == thread:
                self._warnings.append((message, category, filename, lineno, file, line))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = hold_warning

    def _hold_worker_output(self) -> None:
        try:  # Ray's driver-side dispatcher of its processes' output; absent in other Ray versions
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
        if printers:
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", self._worker_output.append)
            self._saved_printer = printers[0]

    def _release(self) -> None:
        """Ray's own handlers back as they were before the start (what was said stays held)."""
        if self._saved_handlers is not None:
            logger = logging.getLogger(RAY_LOGGER)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            handlers, propagate = self._saved_handlers
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate
            self._saved_handlers = None
        if self._saved_showwarning is not None:
            warnings.showwarning = self._saved_showwarning
            self._saved_showwarning = None
        if self._saved_printer is not None:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", self._saved_printer)
            self._saved_printer = None

    # ---- on the driver's thread ----
    def wait(self):
        """Ray's context once it runs (raises what ray.init raised); Ray's output handlers as before."""
        self.waited = True
        self._ready.wait()
        self._release()
        if self._error is not None:
            raise self._error
        return self._context

    def replay(self) -> None:
        """What Ray said while starting, to where its output goes now (after the console opened)."""
        records, self._records = self._records, []
        for record in records:
            logging.getLogger(record.name).handle(record)
        held, self._warnings = self._warnings, []
        for args in held:
            warnings.showwarning(*args)
        output, self._worker_output = self._worker_output, []
        if output:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
            for data in output:
                dispatcher.emit(data)

    def abandon(self) -> None:
        """The driver failed before it took the instance over: stop it, drop what it said."""
        self.waited = True
        self._ready.wait()
        self._release()
        self._records, self._worker_output, self._warnings = [], [], []
        if self._error is None:
            import ray
            ray.shutdown()


class _Holder(logging.Handler):
    def __init__(self, records: list):
        super().__init__(level=logging.NOTSET)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
