"""Benchmarks for ``scalecalc analyze``.

Measures, and prints as Markdown on stdout (progress goes to stderr):

1. Cold CLI time on the largest spec in ``specs/``: the installed ``scalecalc`` console
   script run as a fresh process, for the table and for ``--json``, with ``python -X
   importtime`` contributors and a check of which heavy modules (torch above all) the
   command imports.
2. Time against graph size: synthetic specs of about 100 to 10,000 nodes (a flat
   conv/relu list, the same chain written as a repeated block, and a residual network
   of repeated blocks), with load, build, propagate and report rendering timed
   separately in-process, the whole CLI timed as a subprocess, and a fitted exponent
   (time ∝ nodes^k).
3. ResNet-50 with a symbolic width (``--symbolic w``): CLI wall time and the in-process
   split, and with ``--profile`` the top functions of a cProfile run.

Every in-process measurement runs in a fresh worker process (this file with
``--worker``), so sympy's caches and the expression cache start cold each time and module
imports are excluded from the phase times. Nothing here asserts on timing; this is not a
test.

    python benchmarks/analyze.py            # full run (a few minutes on 2 cores)
    python benchmarks/analyze.py --quick    # smoke run (well under a minute)
    python benchmarks/analyze.py --profile  # also profile the symbolic ResNet-50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mdtable import md_table

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
TIMEOUT = 300.0  # seconds per subprocess; --timeout
LONG_RUN = 30.0  # a measurement this slow is not repeated
HEAVY_MODULES = ("torch", "numpy", "sympy", "networkx", "yaml", "rich", "typer")
MODULES_MARK = "SCALECALC_BENCH_MODULES="
# Run the CLI exactly as the console script does, then report what got imported.
MAIN_SNIPPET = (
    "import sys\n"
    "from scalecalc.cli import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "else:\n"
    "    code = 0\n"
    "import json\n"
    f"mods = {{m: m in sys.modules for m in {HEAVY_MODULES!r}}}\n"
    "mods['total'] = len(sys.modules)\n"
    f"print({MODULES_MARK!r} + json.dumps(mods), file=sys.stderr)\n"
    "sys.exit(code)\n"
)
SYMBOLIC_WORKAROUNDS = (
    # (label, extra CLI arguments), used only when plain `--symbolic w` fails
    ("`--symbolic w --set alpha=sqrt(0.5) --set beta=sqrt(0.5)` (α, β as floats)",
     ["--symbolic", "w", "--set", "alpha=sqrt(0.5)", "--set", "beta=sqrt(0.5)"]),
    ("`--symbolic w --symbolic alpha --symbolic beta`",
     ["--symbolic", "w", "--symbolic", "alpha", "--symbolic", "beta"]),
)


# --------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    value = seconds * 1000
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(size): time ∝ size^slope."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-9)) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def cli_command() -> tuple[list[str], str]:
    """The installed console script next to this interpreter, else an equivalent -c."""
    script = Path(sys.executable).with_name("scalecalc")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], f"`{script}` (console script)"
    return ([sys.executable, "-c", "from scalecalc.cli import main; main()"],
            "`python -c 'from scalecalc.cli import main; main()'`")


def run_timed(cmd: Sequence[str]) -> tuple[float, int, str]:
    """Wall time, exit status and stderr of one subprocess run (stdout discarded)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=TIMEOUT, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, 124, f"timed out after {TIMEOUT:.0f} s"
    return time.perf_counter() - start, proc.returncode, proc.stderr


def time_cli(cmd: Sequence[str], repeat: int, warmup: int = 1) -> dict[str, Any]:
    """Median/min/max wall time of ``repeat`` fresh runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        _, rc, err = run_timed(cmd)
        if rc != 0:
            return {"rc": rc, "error": _first_error(err), "times": []}
    times = []
    for _ in range(repeat):
        elapsed, rc, err = run_timed(cmd)
        if rc != 0:
            return {"rc": rc, "error": _first_error(err), "times": times}
        times.append(elapsed)
        if elapsed > LONG_RUN:
            break
    return {"rc": 0, "error": "", "times": times}


def _first_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and MODULES_MARK not in ln]
    return lines[-1] if lines else "(no message)"


def stats_cells(result: dict[str, Any]) -> list[str]:
    t = result["times"]
    if result["rc"] != 0:
        return ["fails", "–", "–", f"exit {result['rc']}: {result['error']}"]
    return [ms(statistics.median(t)), ms(min(t)), ms(max(t)), str(len(t))]


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one in-process measurement in a fresh interpreter (see ``_worker_main``)."""
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT:.0f} s"}
    if proc.returncode != 0:
        return {"error": _first_error(proc.stderr) or f"worker exit {proc.returncode}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def worker_median(job: dict[str, Any], repeat: int) -> dict[str, Any]:
    """Median of each phase over ``repeat`` fresh workers; stops at the first error."""
    runs = []
    for _ in range(repeat):
        result = worker(job)
        if "error" in result:
            return result
        runs.append(result)
        if sum(v for k, v in result.items() if k in PHASES) > LONG_RUN:
            break
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
    out["nodes"] = runs[0]["nodes"]
    out["runs"] = len(runs)
    if "profile" in runs[0]:
        out["profile"] = runs[0]["profile"]
    return out


# --------------------------------------------------------------------------- the worker

PHASES = ("load", "build", "propagate", "json", "table")


def _accept_sympy_numbers() -> None:
    """Let init constants be exact sympy numbers (e.g. α = √½ kept exact in symbolic mode).

    Only used for the labelled "what-if" row when plain ``--symbolic w`` fails on the
    ResNet-50 spec, to estimate what that command would cost once it runs; the package
    itself is not changed.
    """
    import sympy

    from scalecalc import expr, init

    original = init._number

    def _number(raw: Any, env: Any) -> Any:
        value = expr.evaluate(raw, env) if isinstance(raw, str) else raw
        if isinstance(value, sympy.Basic) and value.is_number and value.is_positive:
            return value
        return original(raw, env)

    init._number = _number


def _worker_main(job: dict[str, Any]) -> None:
    """Time load → build → propagate → JSON → table for one spec, in this process."""
    t0 = time.perf_counter()
    from scalecalc import report
    from scalecalc.errors import ScalecalcError
    from scalecalc.graph import build
    from scalecalc.propagate import propagate
    from scalecalc.spec import load

    if job.get("symbolic"):
        import sympy  # noqa: F401  (imported by build anyway; keep it out of the phase times)
    if job.get("accept_sympy_numbers"):
        _accept_sympy_numbers()
    out: dict[str, Any] = {"import": time.perf_counter() - t0}
    profiler = None
    if job.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    try:
        t = time.perf_counter()
        spec = load(job["spec"])
        out["load"] = time.perf_counter() - t
        if profiler:
            profiler.enable()
        t = time.perf_counter()
        net = build(spec, job.get("overrides") or {}, tuple(job.get("symbolic") or ()))
        out["build"] = time.perf_counter() - t
        t = time.perf_counter()
        analysis = propagate(net)
        out["propagate"] = time.perf_counter() - t
        if profiler:
            profiler.disable()
    except ScalecalcError as err:
        print(json.dumps({"error": str(err)}))
        return
    t = time.perf_counter()
    json.dumps(report.to_dict(analysis), indent=2)
    out["json"] = time.perf_counter() - t
    if job.get("table", True):
        console = _piped_console(report)
        t = time.perf_counter()
        report.print_analysis(analysis, console)
        out["table"] = time.perf_counter() - t
    out["nodes"] = len(net.order)
    out["torch"] = "torch" in sys.modules
    if profiler:
        out["profile"] = _profile_rows(profiler, 15)
    print(json.dumps(out))


def _piped_console(report: Any) -> Any:
    """The console the CLI prints tables to when stdout is not a terminal, into a buffer."""
    import io

    from scalecalc import cli

    make = getattr(cli, "_console", None)
    console = make() if make is not None else report.Console(width=80)
    console.file = io.StringIO()
    return console


def _profile_rows(profiler: Any, top: int) -> list[list[str]]:
    import pstats

    st = pstats.Stats(profiler)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:top]  # type: ignore[attr-defined]
    site = re.compile(r"^.*?(site-packages|lib/python3\.\d+)/")
    out = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in rows:
        where = site.sub("", file).replace(str(ROOT) + "/", "")
        calls = f"{nc}/{cc}" if nc != cc else str(nc)
        out.append([calls, f"{tt:.3f}", f"{ct:.3f}", f"`{where}:{line}({func})`"])
    return out


# --------------------------------------------------------------------------- sections

def section_machine() -> str:
    import importlib.metadata as md

    nproc = shutil.which("nproc")
    nproc_out = subprocess.run([nproc], capture_output=True, text=True, check=False).stdout.strip() \
        if nproc else "n/a"
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = []
    for dist in ("scalecalc", "sympy", "networkx", "PyYAML", "rich", "typer", "numpy", "torch"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    rows = [
        ["Python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["OS", f"{platform.system()} {platform.release()} ({platform.machine()})"],
        ["CPU", cpu],
        ["`os.cpu_count()`", str(os.cpu_count())],
        ["`nproc`", nproc_out],
        ["packages", ", ".join(versions)],
        ["load average at start (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())],
        ["`PYTHONDONTWRITEBYTECODE`", os.environ.get("PYTHONDONTWRITEBYTECODE", "unset")],
    ]
    return "## Machine\n\n" + md_table(["", ""], rows, "ll")


def largest_spec() -> tuple[Path, list[list[str]]]:
    """The spec in specs/ with the most nodes after block expansion (numeric build)."""
    from scalecalc.graph import build
    from scalecalc.spec import load

    counts = []
    for path in sorted(SPECS.glob("*.yaml")):
        try:
            counts.append((len(build(load(path)).order), path))
        except Exception as err:  # a broken example spec should not stop the benchmark
            log(f"skipping {path.name}: {err}")
    counts.sort(reverse=True)
    return counts[0][1], [[f"`{p.relative_to(ROOT)}`", str(n)] for n, p in counts]


def section_cold(spec: Path, repeat: int) -> str:
    base, how = cli_command()
    rel = str(spec.relative_to(ROOT))
    log(f"cold CLI: {rel} ×{repeat}")
    rows = []
    startup = time_cli([sys.executable, "-c", "pass"], repeat)
    rows.append(["`python -c pass` (interpreter start-up only)", *stats_cells(startup)])
    imp = time_cli([sys.executable, "-c", "import scalecalc.cli"], repeat)
    rows.append(["`python -c 'import scalecalc.cli'`", *stats_cells(imp)])
    for extra in ([], ["--json"]):
        res = time_cli([*base, "analyze", rel, *extra], repeat)
        rows.append([f"`scalecalc analyze {rel}{' ' + ' '.join(extra) if extra else ''}`",
                     *stats_cells(res)])
    shim = shutil.which("scalecalc")
    if shim and Path(shim).resolve() != Path(base[0]).resolve():
        res = time_cli([shim, "analyze", rel, "--json"], repeat)
        rows.append([f"same `--json`, via `{shim}` on PATH", *stats_cells(res)])
    text = [f"## Cold CLI on the largest spec (`{rel}`)\n",
            f"Each row is a fresh process (one untimed warm-up first); command: {how}.\n",
            md_table(["command", "median ms", "min ms", "max ms", "runs"], rows)]
    text.append(_modules_report(rel))
    text.append(_importtime_report(rel))
    return "\n".join(text)


def _modules_report(rel: str) -> str:
    lines = ["\n### Modules imported by `analyze`\n"]
    rows = []
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-c", MAIN_SNIPPET, "analyze", rel, *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              check=False)
        found = [ln for ln in proc.stderr.splitlines() if ln.startswith(MODULES_MARK)]
        if not found:
            rows.append([" ".join(["analyze", *extra]), *["?"] * (len(HEAVY_MODULES) + 1)])
            continue
        mods = json.loads(found[-1][len(MODULES_MARK):])
        rows.append([f"`analyze{' ' + ' '.join(extra) if extra else ''}`",
                     *("**yes**" if m == "torch" and mods[m] else "yes" if mods[m] else "no"
                       for m in HEAVY_MODULES), str(mods["total"])])
    align = "l" + "c" * len(HEAVY_MODULES) + "r"
    lines.append(md_table(["run", *HEAVY_MODULES, "modules in total"], rows, align))
    return "\n".join(lines)


def _importtime_report(rel: str, top: int = 12) -> str:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", MAIN_SNIPPET, "analyze", rel, "--json"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, check=False)
    entries = []
    pat = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")
    for line in proc.stderr.splitlines():
        m = pat.match(line)
        if m:
            entries.append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    total = sum(e[0] for e in entries) / 1e6
    first_level = sorted((e for e in entries if e[2] <= 1), key=lambda e: e[1], reverse=True)[:top]
    by_package: dict[str, int] = {}
    for self_us, _cum, _lvl, name in entries:
        pkg = name.split(".")[0]
        by_package[pkg] = by_package.get(pkg, 0) + self_us
    packages = sorted(by_package.items(), key=lambda kv: kv[1], reverse=True)[:top]
    lines = [f"\n### `python -X importtime` (one `--json` run; {ms(total)} ms of imports in total)\n",
             "Top-level imports by cumulative time (includes everything they import):\n",
             md_table(["module", "cumulative ms", "share"],
                      [[f"`{n}`", ms(c / 1e6), f"{c / 1e6 / total:.0%}"] for _s, c, _l, n in first_level]),
             "\nSelf time summed per top-level package:\n",
             md_table(["package", "self ms", "share"],
                      [[f"`{p}`", ms(s / 1e6), f"{s / 1e6 / total:.0%}"] for p, s in packages])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- synthetic specs

def _stages(block: str, units: int, extra: str = "") -> list[str]:
    """Block uses covering ``units`` repetitions (repeat is capped per use)."""
    from scalecalc.spec import MAX_REPEAT

    lines, i = [], 0
    while units > 0:
        n = min(units, MAX_REPEAT)
        lines.append(f"  - {{name: s{i}, block: {block}, repeat: {n}{extra}}}")
        units, i = units - n, i + 1
    return lines


def synthetic(family: str, target: int) -> str:
    """YAML text of a spec with about ``target`` nodes (input included)."""
    # 64×64 keeps the padded 3×3 chains' border loss (≈2% of E[x²] per conv) from
    # underflowing to 0.0 at 5,000 convolutions; the size costs nothing (shapes are numbers)
    head = ["name: synthetic-" + family, "input: {channels: 16, size: 64}",
            "params: {w: 16, alpha: sqrt(1/2)}", "init: {scheme: geometric}"]
    if family == "flat":
        units = max(1, (target - 1) // 2)
        body = ["layers:"]
        for i in range(units):
            body.append(f"  - {{name: c{i}, op: conv, out: w, kernel: 3, padding: 1}}")
            body.append(f"  - {{name: r{i}, op: relu}}")
        return "\n".join(head + body) + "\n"
    if family == "chain":
        units = max(1, (target - 1) // 2)
        body = ["blocks:", "  unit:", "    layers:",
                "      - {name: conv, op: conv, out: w, kernel: 3, padding: 1}",
                "      - {name: relu, op: relu}", "layers:", *_stages("unit", units)]
        return "\n".join(head + body) + "\n"
    if family == "residual":
        units = max(1, (target - 1) // 5)
        body = ["blocks:", "  res:", "    params: {width: 16}", "    layers:",
                "      - {name: relu1, op: relu}",
                "      - {name: conv1, op: conv, out: width, kernel: 3, padding: 1}",
                "      - {name: relu2, op: relu}",
                "      - {name: conv2, op: conv, out: width, kernel: 3, padding: 1}",
                "      - {name: merge, op: add, from: [input, conv2], weights: [alpha, alpha]}",
                "layers:", *_stages("res", units, ", with: {width: w}")]
        return "\n".join(head + body) + "\n"
    raise ValueError(family)


FAMILIES = {
    "flat": "conv/relu chain written out layer by layer (no blocks)",
    "chain": "the same conv/relu chain as one block with `repeat`",
    "residual": "pre-activation residual blocks (relu, conv, relu, conv, weighted add) with `repeat`",
}


def section_scaling(sizes: Sequence[int], repeat: int, cli_repeat: int) -> str:
    base, _ = cli_command()
    text = ["## Time against graph size (numeric)\n",
            "Synthetic specs (16 channels, 64×64, 3×3 convolutions with padding 1, geometric init):\n",
            *[f"- **{k}**: {v}" for k, v in FAMILIES.items()],
            "",
            f"In-process phases are the median of {repeat} fresh worker processes (imports excluded); "
            "`table` renders the rich table into a buffer at the width the CLI uses when piped. "
            f"CLI columns are the median wall time of {cli_repeat} fresh `scalecalc analyze` runs "
            "(start-up and imports included), output discarded. µs/node is in-process "
            "load+build+propagate divided by nodes.\n"]
    fits = []
    with tempfile.TemporaryDirectory(prefix="scalecalc-bench-") as tmp:
        for family in FAMILIES:
            rows, points, skip = [], [], ""
            for i, target in enumerate(sizes):
                if skip:
                    rows.append([f"~{target:,}", "skipped: " + skip, *[""] * 8])
                    continue
                path = Path(tmp) / f"{family}_{target}.yaml"
                path.write_text(synthetic(family, target), encoding="utf-8")
                log(f"scaling: {family} ~{target} nodes")
                r = worker_median({"spec": str(path)}, repeat)
                if "error" in r:
                    rows.append([f"~{target:,}", "error: " + r["error"], *[""] * 8])
                    skip = "the previous size failed"
                    continue
                spent = sum(r[k] for k in PHASES)
                if i + 1 < len(sizes) and points:
                    # extrapolate with the growth seen since the previous size (at least linear)
                    k = max(1.0, fit_exponent([points[-1][0], r["nodes"]], [points[-1][-1], spent]))
                    guess = spent * (sizes[i + 1] / target) ** k
                    if guess > TIMEOUT:
                        skip = (f"~{target:,} nodes took {spent:.1f} s in-process and grew as nodes^{k:.1f}, "
                                f"so ~{sizes[i + 1]:,} would take about {guess:.0f} s, past the "
                                f"{TIMEOUT:.0f} s limit")
                cli_json = time_cli([*base, "analyze", str(path), "--json"], cli_repeat, warmup=0)
                cli_table = time_cli([*base, "analyze", str(path)], cli_repeat, warmup=0)
                core = r["load"] + r["build"] + r["propagate"]
                cj = statistics.median(cli_json["times"]) if cli_json["rc"] == 0 else float("nan")
                ct = statistics.median(cli_table["times"]) if cli_table["rc"] == 0 else float("nan")
                points.append((r["nodes"], r["load"], r["build"], r["propagate"], r["json"], r["table"],
                               core, cj, ct, spent))
                rows.append([f"{r['nodes']:,}", ms(r["load"]), ms(r["build"]), ms(r["propagate"]),
                             ms(r["json"]), ms(r["table"]), ms(core), f"{core / r['nodes'] * 1e6:,.0f}",
                             ms(cj), ms(ct)])
            text.append(f"### {family}\n")
            text.append(md_table(["nodes", "load ms", "build ms", "propagate ms", "json ms", "table ms",
                                  "load+build+propagate ms", "µs/node", "CLI --json ms", "CLI table ms"],
                                 rows))
            text.append("")
            if len(points) >= 2:
                n = [p[0] for p in points]
                cols = {"load": 1, "build": 2, "propagate": 3, "json": 4, "table": 5,
                        "load+build+propagate": 6, "CLI --json": 7, "CLI table": 8}
                fits.append([family, *(f"{fit_exponent(n, [p[i] for p in points]):.2f}"
                                       if all(not math.isnan(p[i]) for p in points) else "–"
                                       for i in cols.values())])
    if fits:
        text.append("### Fitted exponent k (time ∝ nodes^k, least squares on log–log)\n")
        text.append(md_table(["family", "load", "build", "propagate", "json", "table", "load+build+propagate",
                              "CLI --json", "CLI table"], fits))
        text.append("\nk ≈ 1 is linear. The CLI columns include a constant start-up cost, which pulls "
                    "their k below 1 at the small end.")
    return "\n".join(text)


# --------------------------------------------------------------------------- symbolic ResNet-50

def section_symbolic(spec: Path, param: str, repeat: int, quick: bool, profile: bool) -> str:
    base, _ = cli_command()
    rel = str(spec.relative_to(ROOT))
    text = [f"## `{rel}` with a symbolic width (`--symbolic {param}`)\n"]
    log(f"symbolic: {rel} --symbolic {param}")
    cli_rows = []
    plain = time_cli([*base, "analyze", rel, "--symbolic", param], repeat, warmup=0)
    cli_rows.append([f"`scalecalc analyze {rel} --symbolic {param}`", *stats_cells(plain)])
    plain_json = time_cli([*base, "analyze", rel, "--symbolic", param, "--json"], repeat, warmup=0)
    cli_rows.append(["same, `--json`", *stats_cells(plain_json)])
    numeric = time_cli([*base, "analyze", rel, "--json"], repeat, warmup=0)
    cli_rows.append(["numeric, `--json` (for comparison)", *stats_cells(numeric)])
    works = plain["rc"] == 0
    workarounds = [] if works else list(SYMBOLIC_WORKAROUNDS[:1] if quick else SYMBOLIC_WORKAROUNDS)
    for label, args in workarounds:
        log(f"symbolic workaround: {' '.join(args)}")
        res = time_cli([*base, "analyze", rel, *args, "--json"], 1 if "alpha" in args[-1] else repeat,
                       warmup=0)
        cli_rows.append([f"workaround: {label}, `--json`", *stats_cells(res)])
    text.append("### CLI wall time (fresh process each run, output discarded)\n")
    text.append(md_table(["command", "median ms", "min ms", "max ms", "runs"], cli_rows))

    jobs: list[tuple[str, dict[str, Any], int]] = [("numeric", {"spec": rel}, repeat)]
    if works:
        jobs.append((f"`--symbolic {param}`", {"spec": rel, "symbolic": [param]}, repeat))
    else:
        jobs.append((f"`--symbolic {param}`, init constants allowed to be exact sympy numbers (what-if)",
                     {"spec": rel, "symbolic": [param], "accept_sympy_numbers": True}, repeat))
        half = math.sqrt(0.5)
        jobs.append((f"`--symbolic {param}`, α = β = {half:.6g} as floats",
                     {"spec": rel, "symbolic": [param], "overrides": {"alpha": half, "beta": half}}, repeat))
        if not quick:
            jobs.append((f"`--symbolic {param}`, α and β symbolic too",
                         {"spec": rel, "symbolic": [param, "alpha", "beta"]}, 1))
    rows = []
    for label, job, n in jobs:
        log(f"symbolic split: {label}")
        r = worker_median(job, n)
        if "error" in r:
            rows.append([label, "error: " + r["error"], *[""] * 7])
            continue
        core = r["load"] + r["build"] + r["propagate"]
        rows.append([label, f"{r['nodes']:,}", ms(r["load"]), ms(r["build"]), ms(r["propagate"]),
                     ms(r["json"]), ms(r["table"]), ms(core), str(r["runs"])])
    text.append("\n### In-process split (fresh worker process per run; imports excluded)\n")
    text.append(md_table(["variant", "nodes", "load ms", "build ms", "propagate ms", "json ms", "table ms",
                          "load+build+propagate ms", "runs"], rows))
    if not works:
        text.append(f"\n`--symbolic {param}` exits with status {plain['rc']}: `{plain['error']}`. "
                    "The rows marked workaround / what-if show what the symbolic analysis costs by "
                    "other routes; the what-if row replaces the init-constant check inside the "
                    "benchmark's worker process only.")
    if profile:
        label, job, _ = jobs[1]
        log(f"profiling: {label}")
        r = worker({**job, "profile": True, "table": False})
        if "error" in r:
            text.append(f"\nProfile failed: {r['error']}")
        else:
            text.append(f"\n### cProfile of build + propagate, {label}: top 15 by cumulative time\n")
            text.append("Times are under the profiler, which inflates them.\n")
            text.append(md_table(["calls", "tottime s", "cumtime s", "function"], r["profile"], "rrrl"))
    return "\n".join(text)


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> None:
    global TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run: fewer sizes and repeats")
    parser.add_argument("--profile", action="store_true", help="cProfile the symbolic ResNet-50 run")
    parser.add_argument("--repeat", type=int, default=None, help="cold CLI runs per command (default 7)")
    parser.add_argument("--symbolic-spec", default="specs/resnet50_preact.yaml")
    parser.add_argument("--symbolic-param", default="w")
    parser.add_argument("--skip", action="append", default=[], choices=["cold", "scaling", "symbolic"],
                        help="leave out a section (repeatable)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds allowed per subprocess (default {TIMEOUT:.0f})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    TIMEOUT = args.timeout
    if args.worker:
        _worker_main(json.loads(args.worker))
        return
    quick = args.quick
    cold_repeat = args.repeat or (3 if quick else 7)
    sizes = (100, 300, 1000) if quick else (100, 300, 1000, 3000, 10_000)
    phase_repeat, cli_repeat, sym_repeat = (1, 1, 1) if quick else (3, 3, 3)

    started = time.perf_counter()
    spec, counts = largest_spec()
    sections: list[tuple[str, Callable[[], str]]] = [
        ("cold", lambda: section_cold(spec, cold_repeat)),
        ("scaling", lambda: section_scaling(sizes, phase_repeat, cli_repeat)),
        ("symbolic", lambda: section_symbolic(ROOT / args.symbolic_spec, args.symbolic_param, sym_repeat,
                                              quick, args.profile)),
    ]
    out = [f"# scalecalc analyze benchmark{' (--quick)' if quick else ''}\n", section_machine(),
           "\n## Specs in `specs/` (nodes after block expansion, input included)\n",
           md_table(["spec", "nodes"], counts)]
    for name, make in sections:
        if name not in args.skip:
            out.append("\n" + make())
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    out.append(f"\n_Benchmark wall time: {time.perf_counter() - started:.0f} s; "
               f"load average at the end (1/5/15 min): {load}._")
    print("\n".join(out))


if __name__ == "__main__":
    main()
