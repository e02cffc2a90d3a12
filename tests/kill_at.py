"""Run a Python module and SIGKILL it the moment it reaches one source line: a kill at an exact point of a
real run, which a timer cannot hit (a write takes microseconds).

    python tests/kill_at.py FILE 'SOURCE TEXT' -m MODULE [ARGS ...]

FILE is a path suffix (e.g. deeper/outputs.py) and SOURCE TEXT the stripped text of the line: just before that
line first runs, the process kills itself with SIGKILL (no cleanup, no `finally`, no atexit), as the kernel's
OOM killer or a pulled plug would. Exit status -9 tells the caller the line was reached; a run that never
reaches it exits as the module does (so a test can tell "killed there" from "never got there").
"""

from __future__ import annotations

import linecache
import os
import runpy
import signal
import sys
import threading


def main() -> None:
    file, text, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        sys.exit("usage: kill_at.py FILE 'SOURCE TEXT' -m MODULE [ARGS ...]")

    def local(frame, event, _arg):
        if event == "line" and linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip() == text:
            os.kill(os.getpid(), signal.SIGKILL)
        return local

    def trace(frame, event, _arg):  # trace lines only in FILE's frames: the rest runs at full speed
        return local if frame.f_code.co_filename.endswith(file) else None

    sys.settrace(trace)
    threading.settrace(trace)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
