"""MaxwellLink 0.5.0's own end-to-end socket tests, run on its hub and on ours.

    .venv/bin/python benchmarks/maxwelllink_suite.py [--hub both|ours|theirs] [-k EXPR]

Downloads MaxwellLink 0.5.0's sdist (``pip download maxwelllink==0.5.0 --no-deps
--no-binary :all:``, with the peer venv's pip) into a temporary directory, and runs the
socket tests of its ``tests/`` directory (the hub's public API, the TLS relaxations in 1D,
2D and 3D Meep, the single-mode cavity socket-vs-embedded TLS, QuTiP when importable;
psi4, LAMMPS and agent tests are out of scope) with pytest in the peer venv
``.peers/maxwelllink-meep`` (``./dev.sh setup`` builds it: Debian's Meep and numpy,
maxwelllink==0.5.0, pytest), its ``mxl_driver`` on PATH and this repository's src/ on PYTHONPATH.

Run twice: once as shipped (``theirs``) and once with a pytest plugin that makes every
``SocketHub`` name in MaxwellLink's modules (``maxwelllink.SocketHub``,
``maxwelllink.sockets.SocketHub``, ``maxwelllink.sockets.sockets.SocketHub``, and the
solvers' imports) ``maxwellhub.SocketHub`` before any test module is imported (``ours``).
In both runs the plugin records, per test, a SHA-256 of every ``step_barrier`` call's
requested fields and returned amplitudes and extras (float64 bytes), so the two runs'
trajectories are compared bitwise, not only through the tests' tolerances.

It prints the tests, each run's outcome, the step_barrier call count and whether the
digests are equal. Exit status 0 when every test that passed on their hub passed on ours
with equal digests. A benchmark, not part of the suite (minutes, and a download).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / ".peers" / "maxwelllink-meep"
SPEC = "maxwelllink==0.5.0"

#: The end-to-end socket tests of MaxwellLink 0.5.0 in scope (paths in its sdist).
TESTS = [
    "tests/test_sockets/test_socket_hub.py",
    "tests/test_tls/test_meep_1d_socket_tls1_relaxation.py",
    "tests/test_tls/test_meep_2d_socket_tls1_relaxation.py",
    "tests/test_tls/test_meep_2d_socket_tls2_relaxation.py",
    "tests/test_tls/test_meep_3d_socket_tls1_relaxation.py",
    "tests/test_singlemode/test_singlemode_socket_vs_nonsocket.py",
    "tests/test_qutip/test_meep_2d_socket_qutip_tls_relaxation.py",
]

#: With --patch (default): edits applied to the copied tests for BOTH hubs, each printed.
PATCHES = {
    "tests/test_sockets/test_socket_hub.py": [
        (
            '    assert not hasattr(hub, "port")\n',
            "",
            "a characterization of MaxwellLink's base hub (it has no `port`); ours has "
            "`port` (the bound port, useful with port=0), so this line alone fails on ours",
        ),
    ],
}

PLUGIN = r'''
"""pytest plugin: MXH_SWAP=ours puts maxwellhub.SocketHub in MaxwellLink's place;
either way every step_barrier's fields and results are hashed per test into MXH_RECORD."""
import hashlib
import json
import os
import sys

import numpy as np

import maxwelllink
import maxwelllink.sockets.sockets as _mxl_sockets

THEIRS = _mxl_sockets.SocketHub
RECORDS = {}


def _current():
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def _recording(cls):
    inner = cls.step_barrier

    def step_barrier(self, requests, *args, **kwargs):
        results = inner(self, requests, *args, **kwargs)
        rec = RECORDS.setdefault(_current(), {"calls": 0, "hash": hashlib.sha256()})
        rec["calls"] += 1
        h = rec["hash"]
        for mid in sorted(requests):
            h.update(b"F%d" % int(mid))
            h.update(np.asarray(requests[mid]["efield_au"], dtype=np.float64).tobytes())
        h.update(b"|")
        for mid in sorted(results):
            h.update(b"A%d" % int(mid))
            h.update(np.asarray(results[mid]["amp"], dtype=np.float64).tobytes())
            h.update(bytes(results[mid].get("extra", b"") or b""))
        return results

    cls.step_barrier = step_barrier


if os.environ.get("MXH_SWAP") == "ours":
    import maxwellhub

    OURS = maxwellhub.SocketHub
    _recording(OURS)
    swapped = []
    for name, module in list(sys.modules.items()):
        if (name == "maxwelllink" or name.startswith("maxwelllink.")) and getattr(
            module, "SocketHub", None
        ) is THEIRS:
            module.SocketHub = OURS
            swapped.append(name)
    print("mxh_swap: SocketHub is maxwellhub.SocketHub in " + ", ".join(sorted(swapped)))
else:
    _recording(THEIRS)


def pytest_sessionfinish(session, exitstatus):
    out = {k: {"calls": v["calls"], "sha256": v["hash"].hexdigest()} for k, v in RECORDS.items()}
    with open(os.environ["MXH_RECORD"], "w") as f:
        json.dump(out, f, indent=1)
'''


def fetch_tests(where: Path) -> Path:
    """Download and unpack MaxwellLink's sdist into ``where``; return its root."""
    cmd = [
        str(PEER / "bin" / "python"),
        "-m",
        "pip",
        "download",
        SPEC,
        "--no-deps",
        "--no-binary",
        ":all:",
        "-q",
        "--disable-pip-version-check",
        "-d",
        str(where),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    (sdist,) = where.glob("maxwelllink-*.tar.gz")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(where, filter="data")
        else:
            for member in tar.getmembers():
                if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                    raise ValueError(f"unsafe path in {sdist.name}: {member.name}")
            tar.extractall(where)  # members checked above
    # One 3D test finds its data under the first "MaxwellLink" directory of its cwd.
    root = where / "MaxwellLink"
    (where / sdist.name.removesuffix(".tar.gz")).rename(root)
    return root


def apply_patches(root: Path) -> None:
    """Apply PATCHES to the copied tests, printing each; a patch that no longer applies
    is an error (the suite changed)."""
    for rel, edits in PATCHES.items():
        path = root / rel
        text = path.read_text()
        for old, new, why in edits:
            if old not in text:
                raise SystemExit(f"patch no longer applies to {rel}: {old!r}")
            text = text.replace(old, new)
            print(f"patched {rel}: {old.strip()!r} -> {new.strip()!r} ({why})")
        path.write_text(text)


def console_scripts(tmp: Path) -> Path:
    """A directory of wrappers that run the peer venv's ``mxl_driver`` (and ``mxl``) with
    the peer's python, whatever interpreter their shebang names (a venv built in another
    checkout and reached through a symlink keeps that checkout's path there)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("mxl_driver", "mxl"):
        script = PEER / "bin" / name
        if script.exists():
            wrapper = bin_dir / name
            wrapper.write_text(f'#!/bin/sh\nexec "{PEER / "bin" / "python"}" "{script}" "$@"\n')
            wrapper.chmod(0o755)
    return bin_dir


def run(root: Path, hub: str, tmp: Path, select: str | None, timeout: float) -> dict:
    """Run the selected tests on ``hub``; return {test id: outcome, calls, sha256}."""
    junit, record = tmp / f"{hub}.xml", tmp / f"{hub}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    env.update(
        MXH_SWAP=hub,
        MXH_RECORD=str(record),
        PYTHONPATH=f"{tmp}{os.pathsep}{REPO / 'src'}",
        PATH=f"{console_scripts(tmp)}{os.pathsep}{PEER / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONNOUSERSITE="1",
        OMPI_MCA_ess_singleton_isolated="1",
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        str(PEER / "bin" / "python"),
        "-m",
        "pytest",
        "-p",
        "mxh_swap",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        f"--junitxml={junit}",
        *TESTS,
    ]
    if select:
        cmd += ["-k", select]
    print(f"\n$ MXH_SWAP={hub} {' '.join(cmd[2:])}   (in {root})", flush=True)
    done = subprocess.run(cmd, cwd=root, env=env, timeout=timeout, capture_output=True, text=True)
    tail = [
        ln
        for ln in done.stdout.splitlines()
        if ln.startswith(
            ("mxh_swap", "PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "=", "____", "E ")
        )
    ]
    print("\n".join(tail[-60:]), flush=True)
    records = json.loads(record.read_text()) if record.exists() else {}
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        if classname:
            test_id = f"{classname.replace('.', '/')}.py::{name}"
        else:  # a module skipped or broken at collection
            test_id = f"{name.replace('.', '/')}.py"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = (
                    {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[child.tag]
                    + ": "
                    + (child.get("message") or "").splitlines()[0][:100]
                )
        rec = records.get(test_id, {})
        results[test_id] = {"outcome": outcome, **rec}
    return results


def has_qutip() -> bool:
    """Whether the peer venv imports qutip (MaxwellLink's QuTiP driver needs it)."""
    probe = [str(PEER / "bin" / "python"), "-c", "import qutip"]
    return subprocess.run(probe, capture_output=True, timeout=120).returncode == 0


def main() -> int:
    """Run the suite on the chosen hubs and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", choices=("both", "ours", "theirs"), default="both")
    parser.add_argument("-k", dest="select", help="pytest -k expression")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--no-patch",
        dest="patch",
        action="store_false",
        help="run the tests exactly as shipped (see PATCHES)",
    )
    args = parser.parse_args()
    if not (PEER / "bin" / "pytest").exists():
        print(f"{PEER} has no pytest: run ./dev.sh setup first", file=sys.stderr)
        return 2
    hubs = ["theirs", "ours"] if args.hub == "both" else [args.hub]
    with tempfile.TemporaryDirectory(prefix="mxl-suite-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "mxh_swap.py").write_text(PLUGIN)
        root = fetch_tests(tmp)
        if args.patch:
            apply_patches(root)
        select = args.select
        if not has_qutip():
            # Its QuTiP tests start `mxl_driver --model qutip`, which dies at import; the
            # solver then waits for a driver forever (wait_until_bound(timeout=None)).
            select = f"({select}) and not qutip" if select else "not qutip"
            print("qutip is not importable in the peer venv: deselected -k 'not qutip'")
        runs = {hub: run(root, hub, tmp, select, args.timeout) for hub in hubs}
    ids = sorted({t for r in runs.values() for t in r})
    print(
        "\n| test | " + " | ".join(f"{h} hub" for h in hubs) + " | step_barrier calls | bitwise |"
    )
    print("|---|" + "---|" * len(hubs) + "---:|---|")
    ok = True
    for test_id in ids:
        rows = [runs[h].get(test_id, {}) for h in hubs]
        cells = [r.get("outcome", "-") for r in rows]
        calls = "/".join(str(r.get("calls", 0)) for r in rows)
        same = "-"
        if len(hubs) == 2:
            theirs, ours = rows
            if theirs.get("calls"):
                same = "equal" if theirs.get("sha256") == ours.get("sha256") else "DIFFERENT"
            if theirs.get("outcome") == "passed" and (
                ours.get("outcome") != "passed" or same == "DIFFERENT"
            ):
                ok = False
        elif cells[0].startswith(("FAILED", "ERROR")):
            ok = False
        print(f"| {test_id} | " + " | ".join(cells) + f" | {calls} | {same} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
