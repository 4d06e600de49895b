"""A bundle's perplexity where it runs: this host, and aarch64 CPU models under qemu-user.

    sudo python benchmarks/arm64_quality.py BUNDLE [BUNDLE ...] [--root DIR]
        [--cpu cortex-a72,cortex-a76] [--config KEY=VALUE ...] [--threads 2] [--json PATH]

The export's quality gate measures on the machine that exports, but a board multiplies with
other kernels: with int8 activations (accuracy_level 4) onnxruntime's aarch64 build picks
KleidiAI's or MLAS's kernel by the CPU's features (a Cortex-A72, Pi 4, has no int8 dot
product; a Cortex-A76, Pi 5, has), and each quantizes the activations its own way. qemu
emulates integer arithmetic exactly, so a perplexity computed in a Debian arm64 root with
QEMU_CPU set is what that CPU computes; emulated timings mean nothing.

Each bundle is scored on the gate's own tokens (export/quality.py's DEFAULT_TEXT cut and
prefixed as the export did) on this host in-process and, one at a time, in ROOT under every
--cpu; `--config` adds onnxruntime session config entries on every side (e.g.
mlas.disable_kleidiai=1). The "source" column is the manifest's: the fp32 graph of the same
weights, measured at export. ROOT (default $EDGELLM_ARM64_ROOT) is built and the runtime
installed from this checkout by devices/arm64-check.sh --prepare (debootstrap, then pip under
emulation: about four minutes each on a loaded 2-core machine; --no-install skips the pip step).
Each emulated perplexity took 4-12 minutes there. Needs root (chroot, mount) and qemu-user-static.

Prints a table and the results as JSON; exit 0 when every measured ratio is within its
bundle's gate (the manifest's max_ratio), 1 when one is past it, 3 when the run is
impossible here (the reason on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = "/opt/edgellm-check"  # inside ROOT, as devices/arm64-check.sh lays it out
ROOT_PYTHON = f"{WORK}/venv/bin/python"
CPUS = ("cortex-a72", "cortex-a76")
SKIPPED = 3


def unavailable(root: Path | None, build: bool = True) -> str | None:
    """Why an emulated measurement cannot run here, or None. Without `build`, ROOT must
    already hold the runtime (what a test may rely on: building takes minutes and a network)."""
    if root is None:
        return "no arm64 root named (--root or EDGELLM_ARM64_ROOT)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"host is {platform.machine()}, not x86-64: run the quality gate there directly"
    if os.geteuid() != 0:
        return "needs root (chroot and mounting /proc into the arm64 root)"
    ready = (root / WORK.lstrip("/") / "venv/bin/python").exists()
    if not ready and not build:
        return f"{root} holds no prepared runtime (sudo devices/arm64-check.sh --prepare {root})"
    has_qemu = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists() or shutil.which("qemu-aarch64-static")
    if not has_qemu and not shutil.which("apt-get"):
        return "no qemu-user-static and no apt-get to install it"
    if not ready and not shutil.which("debootstrap") and not shutil.which("apt-get"):
        return "no debootstrap to build the arm64 root"
    return None


def measure(bundle: Path, ids: list[int], threads: int, config: dict[str, str]) -> dict[str, Any]:
    """Perplexity of `bundle` on `ids` with the quality gate's own token_nll, in this process."""
    import numpy as np
    import onnxruntime as ort

    from edgellm.export.quality import token_nll
    from edgellm.runtime.bundle import read_manifest

    m = read_manifest(bundle, verify=False)
    nll = token_nll(bundle / m.graph.file, m.graph, m.spec, ids, threads, config)
    return {"machine": platform.machine(), "onnxruntime": ort.__version__, "perplexity": float(np.exp(nll.mean()))}


def gate_ids(bundle: Path) -> list[int]:
    from edgellm.export.quality import eval_ids
    from edgellm.runtime.bundle import read_manifest

    m = read_manifest(bundle, verify=False)
    if m.quality.get("text", "builtin") != "builtin":
        print(f"arm64_quality: {bundle} was gated on a custom text; scoring the built-in one", file=sys.stderr)
    return eval_ids((bundle / "tokenizer.json").read_text(encoding="utf-8"), m.generation, m.spec.max_context)


class Root:
    """The prepared arm64 root with /proc mounted for the duration (onnxruntime opens models
    through /proc/self/fd); the bundles copied in go again on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        self.scratch = path / WORK.lstrip("/") / "quality"

    def __enter__(self) -> "Root":
        proc = self.path / "proc"
        if not os.path.ismount(proc):
            subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
            self.mounted = True
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        shutil.copy(__file__, self.scratch / "arm64_quality.py")
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.mounted:
            subprocess.run(["umount", str(self.path / "proc")], check=False)

    def add(self, bundle: Path, name: str) -> str:
        """Copy (hard-link where it can) `bundle` in; returns its path inside the root."""
        dest = self.scratch / name
        try:
            shutil.copytree(bundle, dest, copy_function=os.link)
        except OSError:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(bundle, dest)
        return f"{WORK}/quality/{name}"

    def measure(self, bundle: str, ids: list[int], cpu: str, threads: int, config: dict[str, str]) -> dict[str, Any]:
        env = ["/usr/bin/env", "-i", "HOME=/root", "LANG=C.UTF-8", "PATH=/usr/local/bin:/usr/bin:/bin",
               f"QEMU_CPU={cpu}"]
        cmd = ["chroot", str(self.path), *env, ROOT_PYTHON, f"{WORK}/quality/arm64_quality.py", "--inside",
               bundle, "--threads", str(threads), *(f"--config={k}={v}" for k, v in config.items())]
        run = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"arm64_quality: the {cpu} run failed:\n{run.stderr[-3000:]}")
        return json.loads(run.stdout)


def prepare(root: Path) -> None:
    """Build ROOT if needed and install this checkout's runtime in it (arm64-check.sh --prepare)."""
    run = subprocess.run(["bash", str(REPO / "devices/arm64-check.sh"), "--prepare", str(root)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode:
        raise SystemExit(f"arm64_quality: preparing {root} failed: {run.stderr.strip()}")


def _config(items: list[str]) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise SystemExit(f"arm64_quality: --config takes KEY=VALUE, got {items}")
    return dict(pairs)


def table(results: dict[str, Any]) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import grid

    sides = ["x86-64", *results["cpus"]]
    rows: list[tuple[str, ...]] = [("bundle", "source", *sides, "gate")]
    for b in results["bundles"]:
        cells = []
        for side in sides:
            r = b["runs"].get(side)
            cells.append("—" if r is None else f"{r['perplexity']:.2f} ({r['ratio']:.3f}x)")
        rows.append((b["name"], f"{b['source_perplexity']:.2f}", *cells, f"{b['max_ratio']:.2f}x"))
    lines = grid(rows)
    config = ", ".join(f"{k}={v}" for k, v in results["config"].items()) or "none"
    lines.append(f"(perplexity on the gate's {results['bundles'][0]['tokens']} tokens, ratio to the source; "
                 f"x86-64: {results['host_cpu']}; aarch64: onnxruntime {results.get('root_onnxruntime', '?')} "
                 f"under qemu-user with QEMU_CPU as named; {results['threads']} threads; session config: {config})")
    return "\n".join(lines)


def host_cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = next((f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in flags), "")
    return f"{name} ({isa})" if isa else name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--root", type=Path, default=os.environ.get("EDGELLM_ARM64_ROOT") or None,
                    help="the Debian arm64 root (built on first use; default $EDGELLM_ARM64_ROOT)")
    ap.add_argument("--cpu", default=",".join(CPUS), help=f"qemu CPU models, comma-separated (default {','.join(CPUS)})")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="an onnxruntime session config entry for every run (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on every side (default 2)")
    ap.add_argument("--no-install", action="store_true",
                    help="use the runtime already installed in ROOT instead of reinstalling this checkout")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the run inside ROOT
    args = ap.parse_args(argv)
    config = _config(args.config)
    if args.inside:  # ids on stdin, one bundle, JSON out
        json.dump(measure(args.bundles[0], json.load(sys.stdin), args.threads, config), sys.stdout)
        return 0
    root = args.root.resolve() if args.root else None
    reason = unavailable(root, build=not args.no_install)
    if reason:
        print(f"arm64_quality: skipped: {reason}", file=sys.stderr)
        return SKIPPED
    assert root is not None
    from edgellm.runtime.bundle import read_manifest

    cpus = [c for c in args.cpu.split(",") if c]
    if not args.no_install:
        print(f"==> preparing {root}", file=sys.stderr, flush=True)
        prepare(root)
    results: dict[str, Any] = {"cpus": cpus, "config": config, "threads": args.threads, "host_cpu": host_cpu(),
                               "bundles": []}
    past = False
    with Root(root) as inside:
        for i, bundle in enumerate(args.bundles):
            m = read_manifest(bundle, verify=False)
            source, max_ratio = m.quality.get("source_perplexity"), m.quality.get("max_ratio", 1.05)
            if source is None:
                raise SystemExit(f"arm64_quality: {bundle}: the manifest has no source perplexity (exported with --no-eval)")
            ids = gate_ids(bundle)
            print(f"==> {bundle}: x86-64", file=sys.stderr, flush=True)
            runs = {"x86-64": measure(bundle, ids, args.threads, config)}
            path = inside.add(bundle, f"b{i}")
            for cpu in cpus:
                print(f"==> {bundle}: {cpu} (emulated, minutes)", file=sys.stderr, flush=True)
                runs[cpu] = inside.measure(path, ids, cpu, args.threads, config)
                results["root_onnxruntime"] = runs[cpu]["onnxruntime"]
            for r in runs.values():
                r["ratio"] = r["perplexity"] / source
                past |= r["ratio"] > max_ratio
            results["bundles"].append({"bundle": str(bundle), "name": bundle.name, "tokens": len(ids),
                                       "source_perplexity": source, "max_ratio": max_ratio, "runs": runs})
    print(table(results))
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if past else 0


if __name__ == "__main__":
    sys.exit(main())
