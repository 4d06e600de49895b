#!/usr/bin/env bash
# Does a bundle pick the same greedy tokens on aarch64 (a Raspberry Pi's CPU) as on this
# x86-64 host? Runs edgellm's runtime in a Debian arm64 root under qemu-user, no board needed.
#
#   sudo devices/arm64-check.sh ROOT BUNDLE [PROMPT [CHAT_MESSAGE]]
#   sudo devices/arm64-check.sh --prepare ROOT   # only build ROOT and install the runtime in it
#
# ROOT is built on first use (debootstrap, a few minutes) and reused after.
# benchmarks/arm64_quality.py uses --prepare, then runs its own perplexity in ROOT. The runtime is
# installed there from this checkout as `pip install .` would, with onnxruntime, numpy and
# tokenizers pinned to the host's versions so only the CPU differs. Exit 0: identical ids for
# the plain prompt and the chat message; 1: a line per difference; 2: setup failed.
# Environment: HOST_PYTHON (default: the checkout's .venv), EDGELLM_CHECK_TOKENS (16),
# EDGELLM_CHECK_THREADS (2; the same on both sides), EDGELLM_CHECK_CPU (qemu's CPU model:
# cortex-a72 is a Raspberry Pi 4, cortex-a76 a Pi 5, max every ARMv8/v9 extension qemu has).
set -euo pipefail

die() { echo "arm64-check: $*" >&2; exit 2; }

prepare_only=0
if [[ ${1:-} == --prepare ]]; then prepare_only=1; shift; fi
[[ $# -ge $((2 - prepare_only)) ]] || die "usage: $0 ROOT BUNDLE [PROMPT [CHAT_MESSAGE]] | $0 --prepare ROOT"
[[ $EUID -eq 0 ]] || die "needs root (mount, chroot, debootstrap)"
root=$(realpath -m "$1")
bundle=$( ((prepare_only)) && echo "" || realpath "$2")
plain=${3:-"The capital of France is"}
chat=${4:-"What is the capital of France?"}
tokens=${EDGELLM_CHECK_TOKENS:-16}
threads=${EDGELLM_CHECK_THREADS:-2}
cpu=${EDGELLM_CHECK_CPU:-cortex-a72}
((prepare_only)) || [[ -f $bundle/manifest.json ]] || die "$bundle: no manifest.json (not a bundle)"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host_py=${HOST_PYTHON:-$repo/.venv/bin/python}
[[ -x $host_py ]] || host_py=python3
work=/opt/edgellm-check  # inside ROOT

# The root can be large and is reused: the copied bundle goes, the mount must never stay.
proc_mounted=0
cleanup() {
    if [[ $proc_mounted -eq 1 ]]; then umount "$root/proc" || echo "arm64-check: could not unmount $root/proc" >&2; fi
    rm -rf "${root:?}$work/bundle"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # so an interrupted run still unmounts

in_root() {
    # A clean environment: the host's PIP_* variables name paths that do not exist in ROOT.
    # Every aarch64 process starts its own qemu, which reads the CPU model from QEMU_CPU;
    # onnxruntime picks its int8 kernels by the features that model reports.
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin QEMU_CPU="$cpu" "$@"
}

enable_binfmt() {
    [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] && return
    local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    if [[ ! -f $conf ]] || ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap >/dev/null \
            || die "apt-get install qemu-user-static debootstrap failed"
    fi
    [[ -e /proc/sys/fs/binfmt_misc/register ]] \
        || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    # The F flag in Debian's entry opens qemu now, so ROOT needs no copy of it.
    [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] \
        || grep -v '^#' "$conf" >/proc/sys/fs/binfmt_misc/register || die "cannot register $conf"
}

make_root() {
    [[ -f $root/.edgellm-root ]] && return
    echo "arm64-check: building $root (debootstrap bookworm arm64, a few minutes)" >&2
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
        bookworm "$root" >/dev/null || die "debootstrap failed (see $root/debootstrap/debootstrap.log); remove $root and retry"
    # pip inside reaches PyPI like the host: same configuration, same CA bundle, same resolver.
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    [[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$root/etc/pip.conf"
    [[ -d /etc/xdg/pip ]] && mkdir -p "$root/etc/xdg" && cp -r /etc/xdg/pip "$root/etc/xdg/"
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    in_root python3 -m venv $work/venv || die "venv in $root failed"
    # pyproject.toml asks for setuptools>=77; bookworm's venv has 66.
    in_root $work/venv/bin/pip install -q "setuptools>=77" || die "pip install setuptools in $root failed"
    touch "$root/.edgellm-root"
}

install_runtime() {
    # Only what `pip install .` packs: no .venv, no tests, no caches.
    rm -rf "${root:?}$work/src" && mkdir -p "$root$work/src"
    cp -r "$repo"/{pyproject.toml,README.md,edgellm,export,devices} "$root$work/src/"
    [[ -f $repo/LICENSE ]] && cp "$repo/LICENSE" "$root$work/src/"
    find "$root$work/src" -name __pycache__ -prune -exec rm -rf {} +
    local pins
    pins=$("$host_py" -c 'import numpy, onnxruntime, tokenizers as t
print(f"onnxruntime=={onnxruntime.__version__} numpy=={numpy.__version__} tokenizers=={t.__version__}")') \
        || die "$host_py cannot import onnxruntime, numpy and tokenizers (set HOST_PYTHON)"
    # shellcheck disable=SC2086  # pins is a word list
    # A local directory is rebuilt and reinstalled on every run, so edits to the checkout get in.
    in_root $work/venv/bin/pip install --no-build-isolation $pins $work/src >"$root$work/pip.log" 2>&1 \
        || die "pip install in $root failed ($pins; see $root$work/pip.log)"
}

write_probe() {
    # The public API has no logits, so the probe listens on the runner's forward to
    # record each step's top two; greedy ids come from Model.generate as any caller gets them.
    cat >"$root$work/probe.py" <<'EOF'
import json, platform, sys
import numpy as np
import onnxruntime
import edgellm

bundle, plain, chat, n, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = edgellm.load(bundle, threads=threads, providers=["CPUExecutionProvider"])
forward, top2 = model._runner.forward, []

def recording(ids):
    logits = forward(ids)
    a, b = (int(i) for i in np.argsort(logits)[-2:][::-1])
    top2.append([a, float(logits[a]), b, float(logits[b])])
    return logits

model._runner.forward = recording
out = {"machine": platform.machine(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "cases": {}}
messages = [{"role": "user", "content": chat}]
for name, prompt, text in (("plain", plain, plain), ("chat", messages, model.render_chat(messages))):
    model.reset()
    top2.clear()
    result = model.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True)
    out["cases"][name] = {"prompt_ids": model.encode(text), "ids": result.token_ids, "top2": top2[: len(result.token_ids)]}
json.dump(out, sys.stdout)
EOF
}

compare() {
    "$host_py" - "$1" "$2" "$cpu" <<'EOF'
import json, sys
host, arm = (json.load(open(p)) for p in sys.argv[1:3])
print(f"arm64-check: host {host['machine']} onnxruntime {host['onnxruntime']} numpy {host['numpy']}; "
      f"emulated {arm['machine']} ({sys.argv[3]}) onnxruntime {arm['onnxruntime']} numpy {arm['numpy']}")
differ = False
for name, h in host["cases"].items():
    a = arm["cases"][name]
    if h["prompt_ids"] != a["prompt_ids"]:
        print(f"arm64-check: {name}: prompt token ids differ (tokenizer), host {len(h['prompt_ids'])} ids, aarch64 {len(a['prompt_ids'])}")
        differ = True
        continue
    if h["ids"] == a["ids"]:
        drift = max(abs(x[1] - y[1]) for x, y in zip(h["top2"], a["top2"]))
        print(f"arm64-check: {name}: {len(h['ids'])}/{len(h['ids'])} greedy ids identical {h['ids']}; "
              f"top logit differs by at most {drift:.2g}")
        continue
    differ = True
    k = next((i for i, (x, y) in enumerate(zip(h["ids"], a["ids"])) if x != y), min(len(h["ids"]), len(a["ids"])))
    same = sum(x == y for x, y in zip(h["ids"], a["ids"]))

    def at(side):
        if k >= len(side["top2"]):
            return "ended"
        t1, l1, t2, l2 = side["top2"][k]
        return f"{t1} over {t2} by {l1 - l2:.4f}"

    print(f"arm64-check: {name}: first difference at token {k}, {same}/{len(h['ids'])} positions agree; "
          f"top-2 margin there: host {at(h)}, aarch64 {at(a)}")
sys.exit(1 if differ else 0)
EOF
}

enable_binfmt
make_root
[[ $(in_root uname -m) == aarch64 ]] || die "$root does not run as aarch64"
if ! mountpoint -q "$root/proc"; then
    # onnxruntime opens models through /proc/self/fd. /sys stays out: with the host's
    # /sys bound in, onnxruntime's cpuinfo crashed under qemu.
    mount -t proc proc "$root/proc" && proc_mounted=1 || die "cannot mount $root/proc"
fi
install_runtime
((prepare_only)) && exit 0
write_probe
rm -rf "${root:?}$work/bundle" && cp -r "$bundle" "$root$work/bundle"
out=$(mktemp -d)
trap 'cleanup; rm -rf "$out"' EXIT
PYTHONPATH=$repo "$host_py" "$root$work/probe.py" "$bundle" "$plain" "$chat" "$tokens" "$threads" >"$out/host.json" \
    || die "host run failed"
in_root $work/venv/bin/python $work/probe.py $work/bundle "$plain" "$chat" "$tokens" "$threads" >"$out/arm.json" \
    || die "aarch64 run failed"
compare "$out/host.json" "$out/arm.json"
