"""Races for tests: the same call made by several processes at the same instant.

`at_once(call, n)` forks n processes that wait at a barrier, then each make `call(i)`, i its
number (0 to n - 1); it returns the tracebacks of those that failed. A forked child leaves by
os._exit: the exit handlers it inherited are the parent's (Prefect's services, started by earlier
tests in this process, fail an assertion when a child runs them: the child would exit 1 for
nothing).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable

JOIN_S = 120


def _racer(call: Callable[[int], object], number: int, barrier, errors) -> None:
    code = 0
    try:
        barrier.wait()
        call(number)
    except BaseException:  # reported to the test: a forked child's stderr is not shown
        errors.put(traceback.format_exc()[-3000:])
        code = 1
    finally:
        os._exit(code)


def at_once(call: Callable[[int], object], n: int) -> list[str]:
    context = mp.get_context("fork")
    barrier = context.Barrier(n, timeout=JOIN_S)
    errors = context.SimpleQueue()  # written at once: no feeder thread for os._exit to cut off
    racers = [context.Process(target=_racer, args=(call, i, barrier, errors))
              for i in range(n)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(JOIN_S)
        if racer.is_alive():
            racer.kill()
            racer.join()
    found = []
    while not errors.empty():
        found.append(errors.get())
    codes = [racer.exitcode for racer in racers]
    if codes != [0] * n and not found:
        found.append(f"exit codes {codes}, no traceback")
    return found
