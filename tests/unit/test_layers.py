"""The layer contract of the maxwellhub package, read from the source with ``ast`` (no
import runs): imports point one way, run -> hub/em -> net/protocol -> errors, the
protocol layer is sans-I/O, and the import graph among maxwellhub modules has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from _util import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "maxwellhub"

# Layer of each module (by dotted name prefix; the longest prefix wins). Higher layers may
# import lower or equal ones, never higher ones.
ERRORS, BASE, NET_PROTOCOL, HUB_EM, RUN = 0, 1, 2, 3, 4
LAYERS = {
    "maxwellhub.errors": ERRORS,
    # leaf helpers with no sockets of their own that any layer may use
    "maxwellhub.units": BASE,
    "maxwellhub.speedups": BASE,  # loads the optional C extensions
    "maxwellhub.fsutil": BASE,
    "maxwellhub.liveness": BASE,  # deadlines and keepalive numbers: opens no socket
    "maxwellhub.parallel.mpi": BASE,  # serial is MPI with one rank
    "maxwellhub.mpi": BASE,  # its old path (an alias module)
    "maxwellhub.models": BASE,  # the molecule models: numpy (and optional packages) only
    # bytes and state; sockets
    "maxwellhub.wire": NET_PROTOCOL,  # old path of protocol.wire (an alias module)
    "maxwellhub.auth": NET_PROTOCOL,  # old path of protocol.auth (an alias module)
    "maxwellhub.protocol": NET_PROTOCOL,
    "maxwellhub.addresses": NET_PROTOCOL,  # old path of net.addresses (an alias module)
    "maxwellhub.net": NET_PROTOCOL,
    "maxwellhub.rendezvous": NET_PROTOCOL,  # old path of net.rendezvous (an alias module)
    # the control endpoint is served by the hub and never imports it
    "maxwellhub.services": NET_PROTOCOL,
    "maxwellhub.hub": HUB_EM,
    "maxwellhub.em": HUB_EM,
    "maxwellhub.pulses": HUB_EM,  # pulse shapes of the EM side
    # job orchestration (maxwellhub.run: config, runner, launch, checkpoint ...), MPMD
    # (maxwellhub.parallel.mpmd), relay, cli, analysis and the old paths' alias modules
    "maxwellhub.run": RUN,
    "maxwellhub": RUN,
}
NAMES = {ERRORS: "errors", BASE: "base", NET_PROTOCOL: "net/protocol", HUB_EM: "hub/em", RUN: "run"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """maxwellhub modules that ``name`` imports anywhere in its file (lazy ones too);
    a name under maxwellhub that is no module is returned as it is (see
    test_every_import_resolves)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m != name and (m in modules or m.split(".")[0] == "maxwellhub")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    return {name: {m for m in targets if m in modules} for name, targets in graph.items()}


def test_every_import_resolves():
    """Every maxwellhub module a module imports exists (a lazy ``from .x import`` left
    behind by a move fails only when that code path runs)."""
    modules = _modules()
    broken = [
        f"{name} imports {m}"
        for name, path in sorted(modules.items())
        for m in sorted(_imports(name, path, modules))
        if m not in modules
    ]
    assert not broken, broken


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_init(name: str) -> bool:
    return _modules()[name].name == "__init__.py"


def test_imports_point_down_the_layers():
    """No module imports a module of a higher layer (run -> hub/em -> net/protocol -> errors)."""
    graph = _graph()
    wrong = [
        f"{a} ({NAMES[_layer(a)]}) imports {b} ({NAMES[_layer(b)]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if _layer(b) > _layer(a) and not (b == "maxwellhub" and _is_package_init(b))
    ]
    print(f"\n{sum(map(len, graph.values()))} imports among {len(graph)} modules; by layer:")
    for layer, label in NAMES.items():
        mods = sorted(m for m in graph if _layer(m) == layer)
        short = ", ".join(m.removeprefix("maxwellhub.") for m in mods)
        print(f"  {label:13s} {len(mods):3d}: {short}")
    assert not wrong, "\n".join(wrong)


def test_protocol_is_sans_io():
    """Nothing in maxwellhub.protocol imports the hub, the net layer, asyncio or socket."""
    bad = []
    for path in (PACKAGE / "protocol").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for n in names:
                if n.split(".")[0] in ("asyncio", "socket", "selectors") or any(
                    part in ("hub", "net") for part in n.lstrip(".").split(".")[:2]
                ):
                    bad.append(f"{path.name}: {n}")
    assert not bad, bad


def test_no_import_cycles():
    """The import graph among maxwellhub modules (lazy imports included) has no cycle."""
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle with them
    pruned = {
        a: {b for b in targets if not (_is_package_init(b) and a.startswith(b + "."))}
        for a, targets in graph.items()
    }
    cycles = _cycles(pruned)
    print(f"\nimport cycles among {len(graph)} maxwellhub modules: {len(cycles)}")
    assert not cycles, cycles
