"""A second CPU-bound process, to see how fastdal and a training step slow down on a busy machine.

The load is a single-threaded float32 matrix-multiply loop in its own Python process: it keeps one core's
vector units and its share of the caches busy, as a neighbouring training job or data loader would. It is
started once and then paused (SIGSTOP) and resumed (SIGCONT), so that quiet and loaded timings can be taken
in alternating rounds of the same process: both see the same state of the machine otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

LOAD_SCRIPT = """
import torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
while True:
    a = torch.tanh(a @ a)  # tanh keeps the values bounded, so the loop never reaches inf/nan slow paths
"""

DESCRIPTION = "one other process: a single-threaded 384x384 float32 matmul loop (torch, 1 thread)"


class BackgroundLoad:
    """``with BackgroundLoad() as load: load.pause(); ...; load.resume(); ...``; killed on exit."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> BackgroundLoad:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT], env=env)
        time.sleep(3.0)  # let it import torch and reach its loop
        return self

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        time.sleep(0.2)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.kill()  # SIGKILL ends a stopped process too
            self.process.wait()
