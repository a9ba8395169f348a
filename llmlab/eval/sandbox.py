"""Running untrusted generated code (HumanEval completions): one subprocess per program, contained.

Every program runs in a fresh temp dir, through ``python -I -S`` with an empty environment (``PATH`` only),
under ``resource`` limits (CPU seconds, address space, file size, process count) and a wall-clock timeout
that kills its whole process group. On top of that, the strongest isolation the machine allows is probed
once at run time (:func:`isolation`):

- ``"bwrap"``: bubblewrap with every namespace unshared (no network, own PIDs), the root file system
  read-only, ``/tmp``, ``/root``, ``/home`` empty;
- ``"unshare"``: ``unshare -Urnpm`` (user, network, PID and mount namespaces: no network, killing the
  sandbox's init ends every process it forked); ``/tmp``, ``/root``, ``/home``, ``/work`` hidden under empty
  tmpfs mounts; as root, the program also runs as ``nobody`` so that the process limit applies;
- ``"rlimits"``: only the resource limits and the timeout (no network isolation: say so in results).

A program passes when it exits with status 0 within the limits.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534
HIDDEN_DIRS = ("/tmp", "/root", "/home", "/work", "/var/tmp", "/run/user")
SANDBOX_DIR = "/mnt"  # where the program's own dir is bound inside the mount namespace


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 16
    wall_seconds: float = 15.0


@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    output: str


def python_for_sandbox() -> str:
    """A system interpreter outside the hidden dirs (the venv may live under /work or /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return candidate
    return sys.executable


def _probe(argv: list[str]) -> bool:
    try:
        r = subprocess.run([*argv, "true"], capture_output=True, timeout=10, preexec_fn=_drop_root)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@lru_cache(maxsize=1)
def isolation() -> str:
    """``"bwrap"``, ``"unshare"`` or ``"rlimits"``: the strongest isolation that works here (probed once)."""
    if shutil.which("bwrap") and _probe(_bwrap_argv(Path("/")) + ["--"]):
        return "bwrap"
    if shutil.which("unshare") and _probe(["unshare", "-Urnpm", "--fork", "--mount-proc"]):
        return "unshare"
    return "rlimits"


def _bwrap_argv(workdir: Path) -> list[str]:
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
            "--die-with-parent", "--new-session"]  # fmt: skip
    for d in HIDDEN_DIRS:
        if os.path.isdir(d):
            argv += ["--tmpfs", d]
    return [*argv, "--bind", str(workdir), SANDBOX_DIR, "--chdir", SANDBOX_DIR]


def _unshare_script(workdir: Path, python: str) -> str:
    # Bind the program's dir first (it lives under /tmp), then hide the directories that hold user data.
    hide = " && ".join(f"mount -t tmpfs -o size=1m none {d}" for d in HIDDEN_DIRS if os.path.isdir(d))
    return (
        f"mount --bind {workdir} {SANDBOX_DIR} && {hide} && cd {SANDBOX_DIR} && exec {python} -I -S prog.py"
    )


def _drop_root() -> None:
    if os.getuid() == 0:  # root ignores RLIMIT_NPROC: run as nobody so the process limit holds
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _limits(limits: Limits) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _drop_root()


def run_program(source: str, limits: Limits | None = None, mode: str | None = None) -> RunResult:
    """Run ``source`` as a Python program in a sandbox (see the module docstring)."""
    limits = limits or Limits()
    mode = mode or isolation()
    python = python_for_sandbox()
    with tempfile.TemporaryDirectory(prefix="llmlab-sandbox-") as tmp:
        workdir = Path(tmp)
        (workdir / "prog.py").write_text(source, encoding="utf-8")
        os.chmod(workdir, 0o777)  # the program runs as nobody and may write scratch files here
        if mode == "bwrap":
            argv = [*_bwrap_argv(workdir), python, "-I", "-S", "prog.py"]
        elif mode == "unshare":
            argv = [
                "unshare",
                "-Urnpm",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                _unshare_script(workdir, python),
            ]
        else:
            argv = [python, "-I", "-S", "prog.py"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _limits(limits),
        )
        try:
            out, _ = proc.communicate(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            return RunResult(False, "timeout", None, out.decode("utf-8", "replace")[-2000:])
        finally:
            _kill_group(proc)  # stray children (a fork that outlived its parent) go too
        text = out.decode("utf-8", "replace")[-2000:]
        return RunResult(
            proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", proc.returncode, text
        )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
