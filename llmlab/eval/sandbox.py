"""Running untrusted generated code (HumanEval completions): one subprocess per program, contained.

Every program runs in a fresh temp dir, through ``python -I -S`` with an empty environment (``PATH`` only),
under ``resource`` limits (CPU seconds, address space, file size, process count) and a wall-clock timeout
that kills its whole process group. On top of that, the strongest isolation the machine allows is probed
once at run time (:func:`isolation`):

- ``"bwrap"``: bubblewrap with every namespace unshared (no network, own PIDs), the root file system
  read-only, ``/tmp``, ``/root``, ``/home`` empty;
- ``"unshare"``: ``unshare -Urnpm`` (user, network, PID and mount namespaces: no network, killing the
  sandbox's init ends every process it forked); ``/tmp``, ``/root``, ``/home``, ``/work`` hidden under empty
  tmpfs mounts;
- ``"rlimits"``: only the resource limits and the timeout (no network isolation: say so in results).

In both namespace modes the program's working dir is a tmpfs of ``Limits.disk_bytes`` (the program and its
input files are copied in), so writing many small files cannot fill the host's disk; as root, the program
runs as ``nobody`` so that the process limit applies. :func:`isolation_report` says in words what is active.

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
    disk_bytes: int = 16 << 20  # size of the program's tmpfs working dir (namespace modes)


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
def available_modes() -> tuple[str, ...]:
    """Every isolation mode that works here, strongest first (probed once); ``"rlimits"`` always works."""
    modes = []
    if shutil.which("bwrap"):
        with tempfile.TemporaryDirectory(prefix="llmlab-sandbox-probe-") as empty:
            if _probe(_bwrap_argv(Path(empty)) + ["--"]):
                modes.append("bwrap")
    if shutil.which("unshare") and _probe(["unshare", "-Urnpm", "--fork", "--mount-proc"]):
        modes.append("unshare")
    return (*modes, "rlimits")


def isolation() -> str:
    """``"bwrap"``, ``"unshare"`` or ``"rlimits"``: the strongest isolation that works here."""
    return available_modes()[0]


def isolation_report(mode: str | None = None) -> str:
    """What the sandbox enforces in ``mode`` (default: :func:`isolation`), in one line for users and logs."""
    mode = mode or isolation()
    limits = "rlimits (CPU, address space, file size, processes), wall-clock timeout, minimal env"
    if mode == "bwrap":
        return f"bwrap namespaces (no network, own PIDs, read-only /, private tmpfs dir) + {limits}"
    if mode == "unshare":
        return (
            f"unshare namespaces (no network, own PIDs, user data dirs hidden, private tmpfs dir) + {limits}"
        )
    return f"{limits} only: NO network or file-system isolation on this machine"


def _bwrap_argv(workdir: Path, disk_bytes: int = 1 << 20) -> list[str]:
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
            "--die-with-parent", "--new-session"]  # fmt: skip
    for d in HIDDEN_DIRS:
        if os.path.isdir(d):
            argv += ["--tmpfs", d]
    # A size-capped tmpfs as the working dir; bind sources resolve on the host, so /tmp's files are reachable.
    argv += ["--size", str(disk_bytes), "--tmpfs", SANDBOX_DIR]
    for path in sorted(workdir.iterdir()):
        argv += ["--ro-bind", str(path), f"{SANDBOX_DIR}/{path.name}"]
    return [*argv, "--chdir", SANDBOX_DIR]


def _unshare_script(workdir: Path, python: str, disk_bytes: int) -> str:
    # Copy the program's files into a size-capped tmpfs first (they live under /tmp), then hide the
    # directories that hold user data.
    hide = " && ".join(f"mount -t tmpfs -o size=1m none {d}" for d in HIDDEN_DIRS if os.path.isdir(d))
    return (
        f"mount -t tmpfs -o size={disk_bytes} none {SANDBOX_DIR} && cp -r {workdir}/. {SANDBOX_DIR}/ && "
        f"chmod 777 {SANDBOX_DIR} && {hide} && cd {SANDBOX_DIR} && exec {python} -I -S prog.py"
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


def run_program(
    source: str,
    limits: Limits | None = None,
    mode: str | None = None,
    files: dict[str, str] | None = None,
) -> RunResult:
    """Run ``source`` as a Python program in a sandbox (see the module docstring); ``files`` (name -> text)
    are put beside it in its working dir."""
    limits = limits or Limits()
    mode = mode or isolation()
    python = python_for_sandbox()
    with tempfile.TemporaryDirectory(prefix="llmlab-sandbox-") as tmp:
        workdir = Path(tmp)
        for name, text in (files or {}).items():
            if Path(name).name != name or name == "prog.py":
                raise ValueError(
                    f"sandbox input file name {name!r} must be a plain file name other than prog.py"
                )
            (workdir / name).write_text(text, encoding="utf-8")
            os.chmod(workdir / name, 0o644)
        (workdir / "prog.py").write_text(source, encoding="utf-8")
        os.chmod(workdir / "prog.py", 0o644)
        os.chmod(workdir, 0o777)  # the program runs as nobody and may write scratch files here (rlimits mode)
        if mode == "bwrap":
            argv = [*_bwrap_argv(workdir, limits.disk_bytes), python, "-I", "-S", "prog.py"]
        elif mode == "unshare":
            argv = [
                "unshare",
                "-Urnpm",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                _unshare_script(workdir, python, limits.disk_bytes),
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
