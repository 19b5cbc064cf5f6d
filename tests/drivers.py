"""Run `python -m dsdtune.study` as a user's terminal would (its own session, output collected), and wait."""
import os
import subprocess
import sys
import threading
import time


def start_study(args, cwd):
    """(process, list its output lines are appended to as they come)."""
    proc = subprocess.Popen([sys.executable, "-m", "dsdtune.study", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "token"})
    lines = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    return proc, lines


def wait_for(predicate, timeout, what, poll_s=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
