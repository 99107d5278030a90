"""A full disk for tests, without root: a small tmpfs in a user and mount namespace of its own.

`on_small_disk(script, disk, cwd, size)` runs the shell `script` in `unshare -rm` (a user
namespace in which this user may mount, and a mount namespace that no other process sees) after
mounting a tmpfs of `size` at `disk`. Files the script writes elsewhere (the test's tmp_path)
stay for the test to read; the tmpfs and what it held end with the script, so the script itself
checks what must be checked on the full disk and writes its findings out. `fill(disk)` is the
shell line that fills the disk to the last block. Where user namespaces are not allowed, the
test is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Fills the disk: dd stops at ENOSPC (and says so: not an error of the script).
FILL = 'dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null || true'


def namespaces_allowed() -> str | None:
    """None where `unshare -rm` may mount a tmpfs here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return f"user namespaces are not allowed here: {probe.stderr.strip()}"
    return None


def on_small_disk(script: str, disk: Path, cwd: Path, size: str,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `script` (sh -e) with a tmpfs of `size` (e.g. "3m") mounted at `disk`; $DISK and
    $PY (this interpreter) are set. Skips the test where namespaces are not allowed."""
    reason = namespaces_allowed()
    if reason:
        pytest.skip(reason)
    disk.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "DISK": str(disk), "PY": sys.executable}
    mount = f'mount -t tmpfs -o size={size} tmpfs "$DISK"\n'
    return subprocess.run(["unshare", "-rm", "sh", "-ec", mount + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
