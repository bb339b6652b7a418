"""The HF experts backend's tests (tests/test_hf_backend.py) under each transformers minor release.

    python scripts/transformers_versions.py                 # the newest patch of every minor from 5.6 on
    python scripts/transformers_versions.py 5.7 5.20.2      # these (a minor means its newest patch)
    python scripts/transformers_versions.py --fast 5.7      # the version-sensitive tests only (as CI runs them)

Each release is installed with pip into a directory of its own (``pip install --target
DIR/<version> transformers==<version>``, with the dependencies it declares, from scratch; kept and
reused on a later run) and put first on PYTHONPATH, before this checkout and the running Python's
own packages (torch, pytest). That Python's ``kernels`` package, which only the newest releases
require (older ones take it as an optional extra and fail to import a newer one), is hidden from
releases that do not require it (a sitecustomize.py in DIR/_hide_kernels), as it is absent where
such a release is installed on its own.

Prints one row per release: the backend's state there, the model families whose tiny model builds
and runs with grouped_mm there ("built", tests/_hf_tiny.py; the others are listed with the reason
their tests skipped) and of those the ones whose logits and generate() both match grouped_mm's with
the backend, and the module's other tests. Exits 1 if any test failed. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_hf_backend.py"
FIRST_MINOR = (5, 6)  # one minor below the backend's floor (5.7): the row shows it unregistered
# --fast: the tests whose outcome depends on the transformers release (every family's logits, the
# expert-parallel placeholders, the post-expert norm, the registration); not generate(), the
# compiled path or the subprocess tests of the import hook.
FAST = "logits or placeholders or post_expert or registered or enumerated or token_counts"
FAMILY_TESTS = ("test_logits_match_grouped_mm_and_op_runs_once_per_experts_call", "test_generate_keeps_the_backend")
HIDE_KERNELS = 'import sys\nsys.modules["kernels"] = None  # importlib.util.find_spec("kernels") -> None\n'
STATE = ("import json, fused_moe_ops\n"
         "try:\n    import transformers.integrations.moe\nexcept ImportError:\n    pass\n"
         "from fused_moe_ops.integrations import transformers as hf\n"
         "import transformers\nprint(json.dumps({'version': transformers.__version__, **hf.state()}))\n")


def _key(version: str) -> Tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def released_versions() -> List[str]:
    """The newest patch of each transformers minor from FIRST_MINOR on, as ``pip index`` lists them."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                         text=True, check=True).stdout
    listed = re.search(r"Available versions:\s*(.*)", out).group(1).split(", ")
    newest: Dict[Tuple[int, int], str] = {}
    for v in listed:
        if not re.fullmatch(r"\d+\.\d+\.\d+", v.strip()):
            continue  # pre-releases
        minor = _key(v)[:2]
        if minor >= FIRST_MINOR and (minor not in newest or _key(v) > _key(newest[minor])):
            newest[minor] = v.strip()
    return [newest[m] for m in sorted(newest)]


def resolve(requested: List[str]) -> List[str]:
    if not requested:
        return released_versions()
    if all(v.count(".") == 2 for v in requested):
        return requested
    known = released_versions()
    out = []
    for v in requested:
        if v.count(".") == 2:
            out.append(v)
            continue
        patches = [k for k in known if _key(k)[:2] == _key(v)[:2]]
        if not patches:
            sys.exit(f"no release of transformers {v} listed (from {FIRST_MINOR[0]}.{FIRST_MINOR[1]} on)")
        out.append(patches[-1])
    return out


def install(version: str, base: Path) -> Path:
    target = base / version
    if not (target / "transformers").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
                        "--target", str(target), f"transformers=={version}"], check=True)
    return target


def requires_kernels(target: Path) -> bool:
    for meta in target.glob("transformers-*.dist-info/METADATA"):
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.startswith("Requires-Dist: kernels") and "extra ==" not in line:
                return True
    return False


def environment(target: Path, base: Path) -> Dict[str, str]:
    paths = [str(target)]
    if not requires_kernels(target):
        hide = base / "_hide_kernels"
        hide.mkdir(parents=True, exist_ok=True)
        (hide / "sitecustomize.py").write_text(HIDE_KERNELS)
        paths.append(str(hide))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def results(junit: Path) -> Dict[str, Tuple[str, str]]:
    """test id -> (passed | failed | skipped | xfailed, the skip's or xfail's reason)."""
    out = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).iter("testcase"):
        status, why = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                why = (child.get("message") or "").replace("Skipped: ", "")
        out[case.get("name")] = (status, why)
    return out


def summarize(res: Dict[str, Tuple[str, str]]) -> dict:
    """A family is built when none of its tests skipped or xfailed (its tiny model builds and runs
    with grouped_mm), passed when all of them passed."""
    families: Dict[str, List[str]] = {}
    why_not: Dict[str, str] = {}
    other = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    failed = []
    for name, (status, why) in res.items():
        m = re.fullmatch(r"(\w+)\[(.+)\]", name)
        if m and m.group(1) in FAMILY_TESTS:
            families.setdefault(m.group(2), []).append(status)
            if why:
                why_not.setdefault(m.group(2), why)
        else:
            other[status] += 1
        if status == "failed":
            failed.append(name)
    built = [f for f, s in families.items() if all(x in ("passed", "failed") for x in s)]
    passed = [f for f in built if all(x == "passed" for x in families[f])]
    not_built = {f: why_not.get(f, "") for f in sorted(set(families) - set(built))}
    return {"enumerated": len(families), "built": len(built), "passed": len(passed),
            "not_built": not_built, "other": other, "failed": failed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="*", help="releases (5.20.2) or minors (5.20); default: every minor from 5.6")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fused_moe_ops_transformers",
                    help="where each release is installed (default: %(default)s)")
    ap.add_argument("--fast", action="store_true", help="only the tests that depend on the release: " + FAST)
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args()
    base = args.dir.resolve()
    rows = []
    for version in resolve(args.versions):
        start = time.time()
        target = install(version, base)
        env = environment(target, base)
        state = subprocess.run([sys.executable, "-c", STATE], capture_output=True, text=True, env=env, cwd=ROOT)
        info = json.loads(state.stdout.strip().splitlines()[-1]) if state.returncode == 0 else {
            "registered": False, "reason": "import failed: " + (state.stderr.strip().splitlines() or ["?"])[-1]}
        junit = base / f"junit-{version}.xml"
        junit.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", TEST, "-p", "no:cacheprovider", "-q", "-n", "0",
               "--junitxml", str(junit)] + (["-k", FAST] if args.fast else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        summary = summarize(results(junit))
        if proc.returncode not in (0, 5) and not summary["failed"]:
            summary["failed"] = [f"pytest exit status {proc.returncode}"]
        if summary["failed"]:
            print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
        row = {"version": version, "registered": info.get("registered"), "reason": info.get("reason"),
               "seconds": round(time.time() - start), **summary}
        rows.append(row)
        print(f"transformers {version}: {row['passed']}/{row['built']} families pass "
              f"({row['enumerated']} enumerated), other tests {row['other']}, {row['seconds']} s", flush=True)
    print()
    print(f"{'transformers':<13} {'backend':<15} {'families passed/built':<22} {'other tests':<34} seconds")
    for r in rows:
        backend = "registered" if r["registered"] else "not registered"
        fam = f"{r['passed']}/{r['built']}" + (f" ({r['enumerated']} enumerated)" if r["enumerated"] != r["built"] else "")
        o = r["other"]
        other = f"{o['passed']} passed, {o['failed']} failed, {o['skipped']} skipped"
        print(f"{r['version']:<13} {backend:<15} {fam:<22} {other:<34} {r['seconds']}")
        if not r["registered"]:
            print(f"{'':<13} {r['reason']}")
        for family, why in r["not_built"].items():
            print(f"{'':<13} not built: {family}: {why[:160]}")
        for name in r["failed"]:
            print(f"{'':<13} FAILED {name}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
