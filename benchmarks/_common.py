"""Helpers shared by the benchmark scripts: building the C programs, pinning processes to
cores, reading a child's JSON lines with a deadline, per-process CPU time, the machine.

Standard library only: ``hub_throughput.py --serve maxwelllink`` imports this module in
MaxwellLink's own venv, where maxwellhub is not installed. Nothing here measures anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: "Hub on one core and clients on the other".
HUB_CORE, CLIENT_CORE = 0, 1

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class Skip(Exception):
    """A measurement that cannot run here; the message says why."""


def skip_with_log(exc: BaseException, errors) -> Skip:
    """A :class:`Skip` for a failed measurement: ``exc`` and the last three lines the
    failing process wrote to ``errors`` (a binary file it logged to)."""
    errors.seek(0)
    tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
    return Skip(f"failed: {exc}: {' / '.join(tail)}")


def build(name: str) -> Path:
    """Compile ``benchmarks/c/<name>.c`` with ``cc -O2`` into a per-user temp directory
    (keyed by the source's hash, so an edit rebuilds) and return the executable."""
    source = HERE / "c" / f"{name}.c"
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"maxwellhub-bench-{os.getuid()}" / digest / name
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Skip("no C compiler (cc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}")
    done = subprocess.run(
        [cc, "-O2", "-o", str(tmp), str(source), "-lm"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise Skip(f"cc failed on {source.name}: {done.stderr.strip()[-300:]}")
    os.replace(tmp, out)
    return out


def can_pin() -> bool:
    """True when both benchmark cores exist and this process may run on them."""
    return hasattr(os, "sched_setaffinity") and {HUB_CORE, CLIENT_CORE} <= os.sched_getaffinity(0)


def pin_to(core: int):
    """A ``preexec_fn`` pinning the child to ``core`` (what ``taskset -c core`` does), or
    None when pinning is not possible here."""
    if not can_pin():
        return None
    return lambda: os.sched_setaffinity(0, {core})


def child_env() -> dict[str, str]:
    """Our environment with BLAS pinned to one thread (no idle BLAS threads in children)."""
    env = dict(os.environ)
    env.update({k: "1" for k in _THREAD_VARS})
    return env


def raise_nofile(need: int) -> int:
    """Raise the soft limit on open files to ``need`` if the hard limit allows; return the
    soft limit now in force (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Marks the lines a child reports on; other lines (a library's own prints) are ignored.
PREFIX = b"@bench "


def emit(**fields) -> None:
    """One report line on stdout, flushed (how a child reports to its parent)."""
    print(PREFIX.decode() + json.dumps(fields), flush=True)


class JsonLines:
    """Read a child's report lines (``@bench {json}``) with a deadline, skipping any other
    output, so a stuck child cannot hang the benchmark."""

    def __init__(self, proc: subprocess.Popen) -> None:
        if proc.stdout is None:
            raise ValueError("JsonLines reads a child started with stdout=subprocess.PIPE")
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, deadline: float) -> dict | None:
        """The next report as a dict; None at end of output. Raises TimeoutError."""
        while True:
            line = self._line(deadline)
            if line is None or line.startswith(PREFIX):
                return None if line is None else json.loads(line[len(PREFIX) :])

    def _line(self, deadline: float) -> bytes | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no output from the child in time")
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of process ``pid``, in seconds.

    From /proc/<pid>/task/*/schedstat (nanoseconds on CPU) when the kernel has it, else
    /proc/<pid>/stat (clock ticks, 10 ms resolution: only good for long runs).
    """
    total, found = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise Skip(f"process {pid} is gone") from None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                found = True
        except (FileNotFoundError, ProcessLookupError):
            continue
    if found:
        return total * 1e-9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values) -> float:
    return statistics.median(values)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """Wait for a child we started; kill it (by its own handle) if it does not exit."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=5)


def machine() -> str:
    """One line naming the machine: CPU model, cores, kernel, Python."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()} ({sys.executable})"
    )


def peer_python() -> Path | None:
    """The Python of MaxwellLink's venv: $MAXWELLHUB_MXL_PYTHON, else the venv named by
    $MAXWELLHUB_MXL_VENV (as in the tests), else .peers/maxwelllink; None if absent."""
    if os.environ.get("MAXWELLHUB_MXL_PYTHON"):
        path = Path(os.environ["MAXWELLHUB_MXL_PYTHON"])
    else:
        venv = os.environ.get("MAXWELLHUB_MXL_VENV") or REPO / ".peers" / "maxwelllink"
        path = Path(venv) / "bin" / "python"
    return path if path.exists() else None


def fmt(x: float, digits: int = 3) -> str:
    """A number for a table: thousands separators for large values, else `digits`
    significant figures."""
    if x != x:  # nan
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"
