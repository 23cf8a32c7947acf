"""TensorFlow's start-up lines on a CPU-only machine: filtered out of the stage's log, and nothing else.

Importing TensorFlow 2.21 on a machine without CUDA prints C++ log lines that say nothing is wrong: "Could
not find cuda drivers" and absl's "All log messages before absl::InitializeLog()" (each twice: two
libraries carry their own copy), the oneDNN notice, the CPU-feature notice and a ``failed call to cuInit``
error with code 303 (no driver installed). ``TF_CPP_MIN_LOG_LEVEL=2`` stops only the CPU-feature notice:
the others are printed from the libraries' load-time constructors, before TensorFlow reads that setting,
and the cuInit line is an ERROR. So :func:`quiet` also puts a filter on the process's stderr (fd 2): a
separate small process that drops exactly those messages and passes every other byte through, in order.
Being a separate process, it outlives a crash of the stage, so a traceback, a fatal ``F`` line or any
other error still reaches the terminal. ``settings.log_level: DEBUG`` leaves everything as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys

# The filter process: lines in, the same lines out but the known start-up messages
FILTER = r"""
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: keep draining until EOF
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ts = rb"\d{4} \d\d:\d\d:[\d.]+ +\d+ "  # absl's prefix after the severity letter
drop = [re.compile(p) for p in (
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\r?\n?$",
    rb"^I" + ts + rb"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.",
    rb"^I" + ts + rb"port\.cc:\d+\] oneDNN custom operations are on\. ",
    rb"^I" + ts + rb"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    rb"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.",
    rb"^E" + ts + rb"cuda_platform\.cc:\d+\] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: "
    rb"UNKNOWN ERROR \(303\)\r?\n?$",
)]
out = sys.stdout.buffer
for line in iter(sys.stdin.buffer.readline, b""):
    if not any(p.match(line) for p in drop):
        try:
            out.write(line)
            out.flush()
        except OSError:
            pass
"""

_filter: dict[str, object] = {}


def quiet() -> None:
    """Before TensorFlow is first imported: set ``TF_CPP_MIN_LOG_LEVEL=2`` (C++ errors still show) unless it is
    set, and filter TensorFlow's start-up messages out of fd 2 (see the module docstring). Does nothing when
    TensorFlow is already imported (too late for both) or the filter already runs."""
    if _filter or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    real_stderr = os.dup(2)
    os.set_inheritable(real_stderr, False)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", FILTER], stdin=subprocess.PIPE, stdout=real_stderr, stderr=real_stderr
    )
    os.dup2(proc.stdin.fileno(), 2)  # this process's fd 2, and its children's, now feed the filter
    proc.stdin.close()
    _filter.update(proc=proc, real_stderr=real_stderr)
    atexit.register(_restore)


def _restore() -> None:
    """At exit: give fd 2 back and let the filter write what it holds, so it precedes the shell's prompt."""
    proc = _filter["proc"]
    sys.stderr.flush()
    os.dup2(_filter["real_stderr"], 2)  # closes this process's end of the pipe: the filter sees EOF
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)  # type: ignore[attr-defined]
