"""A process that must not outlive the one that started it: a DDP rank and its torchrun, a
search's worker and each trial's training. Linux's PR_SET_PDEATHSIG, as torch.multiprocessing.spawn
uses for its children: the kernel signals the child when its parent ends, however it ends (SIGKILL
included, which no handler sees). The parent names itself in an environment variable, so a child
whose parent ended before the request (while it was starting) ends at once too."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_env: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent (the pid in `parent_env`)
    ends; at once, when it has ended already. Nothing when the variable is unset (not started
    that way) or elsewhere than Linux. The signal comes when the parent's thread that started
    this process ends: start such children from a thread that lives as long as they should."""
    parent = os.environ.get(parent_env)
    if not sys.platform.startswith("linux") or parent is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(parent):  # it ended before the request: nobody would send it
        os.kill(os.getpid(), sig)
