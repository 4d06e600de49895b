"""Device profiles: how many threads, which execution providers, how much context a board gets.

A profile is a small TOML file. The built-in ones live in the repository's `devices/`
folder; a wheel carries them as `edgellm/profiles/` (pyproject maps one onto the other),
so both a source checkout and an installed package find them. `detect()` picks the
profile whose hints (device-tree model, files, CPU model, OS) match this machine best.
"""
from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError
from .model_spec import ModelSpec

# Wheel layout first; the checkout's devices/ serves editable installs and running from source.
_PACKAGE = Path(__file__).resolve().parents[1]  # edgellm/
_PROFILE_DIRS = (_PACKAGE / "profiles", _PACKAGE.parent / "devices")

# onnxruntime.get_all_providers() of 1.32, copied so a typo fails at load time instead of
# silently falling back to CPU, and without importing onnxruntime here.
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider", "VitisAIExecutionProvider",
    "QNNExecutionProvider", "NnapiExecutionProvider", "VSINPUExecutionProvider",
    "JsExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider",
    "RknpuExecutionProvider", "WebNNExecutionProvider", "WebGpuExecutionProvider",
    "XnnpackExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider",
    "CPUExecutionProvider",
)
QUANTS = ("int4", "int8", "fp16", "fp32")
HINT_KEYS = ("device_tree_model", "device_tree_compatible", "files", "cpu_model", "machine", "system")
_FIELDS = ("name", "description", "threads", "providers", "max_context", "memory_limit_mb",
           "recommended_quant", "slots", "detect")

Provider = tuple[str, dict[str, str]]


class ProfileError(EdgeLLMError, ValueError):
    """A device profile is unknown or one of its fields is invalid."""


@dataclass(frozen=True)
class DeviceProfile:
    """What the runtime needs to know about a board.

    `providers` is ordered, each `(name, options)` with string options, the shape
    `onnxruntime.InferenceSession(providers=...)` accepts as is. `detect` is a tuple of
    rules; a rule matches when every hint in it matches (any listed value per hint).
    """

    name: str
    description: str
    threads: int
    providers: tuple[Provider, ...]
    max_context: int
    memory_limit_mb: int
    recommended_quant: str
    slots: int = 1  # requests `edgellm serve` decodes together (continuous batching)
    detect: tuple[dict[str, tuple[str, ...]], ...] = ()
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "threads": self.threads,
            "providers": [{"name": n, **o} if o else n for n, o in self.providers],
            "max_context": self.max_context,
            "memory_limit_mb": self.memory_limit_mb,
            "recommended_quant": self.recommended_quant,
            "slots": self.slots,
            "detect": [{k: list(v) for k, v in rule.items()} for rule in self.detect],
            "path": self.path,
        }


def _profile_dir() -> Path:
    for d in _PROFILE_DIRS:
        if any(d.glob("*.toml")):
            return d
    raise ProfileError(f"no device profiles found in {' or '.join(str(d) for d in _PROFILE_DIRS)}")


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in _profile_dir().glob("*.toml"))


def load_profile(name_or_path: str | os.PathLike[str], root: str | os.PathLike[str] = "/") -> DeviceProfile:
    """A built-in profile by name, or any profile by `.toml` path.

    `root` is where `threads = "auto"` counts physical cores (a fake root in tests).
    """
    text = str(name_or_path)
    builtin = not (text.endswith(".toml") or os.sep in text or "/" in text)
    if not builtin:
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"{path}: device profile file not found")
    else:
        path = _profile_dir() / f"{text}.toml"
        if not path.is_file():
            raise ProfileError(f"unknown device profile {text!r}; known: {', '.join(list_profiles())}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})") from None
    profile = _parse(data, path, Path(root))
    if builtin and profile.name != path.stem:
        raise ProfileError(f"{path}: field 'name' is {profile.name!r}, must match the file name {path.stem!r}")
    return profile


def _parse(data: dict[str, Any], path: Path, root: Path) -> DeviceProfile:
    def bad(field: str, why: str) -> ProfileError:
        return ProfileError(f"{path}: field {field!r} {why}")

    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"is not a profile field (known: {', '.join(_FIELDS)})")
    for key in ("name", "description", "recommended_quant"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise bad(key, "is missing or not a non-empty string")
    if data["recommended_quant"] not in QUANTS:
        raise bad("recommended_quant", f"must be one of {', '.join(QUANTS)}, got {data['recommended_quant']!r}")
    for key in ("max_context", "memory_limit_mb"):
        if not _positive_int(data.get(key)):
            raise bad(key, f"must be a positive integer, got {data.get(key)!r}")
    if not _positive_int(data.get("slots", 1)):
        raise bad("slots", f"must be a positive integer, got {data.get('slots')!r}")
    threads = data.get("threads")
    if threads == "auto":
        threads = physical_cores(root)
    elif not _positive_int(threads):
        raise bad("threads", f"must be a positive integer or \"auto\", got {threads!r}")
    return DeviceProfile(
        name=data["name"],
        description=data["description"],
        threads=threads,
        providers=_providers(data.get("providers"), bad),
        max_context=data["max_context"],
        memory_limit_mb=data["memory_limit_mb"],
        recommended_quant=data["recommended_quant"],
        slots=data.get("slots", 1),
        detect=_rules(data.get("detect", []), bad),
        path=str(path),
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _providers(raw: Any, bad) -> tuple[Provider, ...]:
    if not isinstance(raw, list) or not raw:
        raise bad("providers", "must be a non-empty list of provider names or tables")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"]
            options = {k: _option(v, bad, f"providers[{i}].{k}") for k, v in item.items() if k != "name"}
        else:
            raise bad(f"providers[{i}]", "must be a provider name or a table with a 'name'")
        if name not in KNOWN_PROVIDERS:
            raise bad(f"providers[{i}]", f"names unknown provider {name!r} (known: {', '.join(KNOWN_PROVIDERS)})")
        out.append((name, options))
    return tuple(out)


def _option(value: Any, bad, field: str) -> str:
    # onnxruntime's option parsers all read booleans as "1"/"0"; str(True) would be "True".
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise bad(field, f"must be a string, number or boolean, got {type(value).__name__}")


def _rules(raw: Any, bad) -> tuple[dict[str, tuple[str, ...]], ...]:
    if not isinstance(raw, list):
        raise bad("detect", "must be an array of tables ([[detect]])")
    rules = []
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict) or not rule:
            raise bad(f"detect[{i}]", "must be a non-empty table of hints")
        for key, values in rule.items():
            if key not in HINT_KEYS:
                raise bad(f"detect[{i}].{key}", f"is not a hint (known: {', '.join(HINT_KEYS)})")
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                raise bad(f"detect[{i}].{key}", "must be a non-empty list of strings")
        rules.append({k: tuple(v) for k, v in rule.items()})
    return tuple(rules)


def physical_cores(root: str | os.PathLike[str] = "/") -> int:
    """Physical cores (not SMT threads), at least 2.

    Each physical core has one distinct sibling list in sysfs, which stays right on
    big.LITTLE parts where core_id repeats across clusters.
    """
    cpus = Path(root, "sys/devices/system/cpu")
    siblings = set()
    for cpu in cpus.glob("cpu[0-9]*"):
        for name in ("core_cpus_list", "thread_siblings_list"):
            f = cpu / "topology" / name
            if f.is_file():
                siblings.add(f.read_text().strip())
                break
    return max(2, len(siblings) or os.cpu_count() or 1)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


def _facts(root: Path, machine: str, system: str, processor: str) -> dict[str, Any]:
    cpuinfo = _read(root / "proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
              if ":" in line and line.split(":", 1)[0].strip().lower() in ("model name", "hardware", "model", "cpu model")]
    return {
        "device_tree_model": _read(root / "proc/device-tree/model").lower(),
        "device_tree_compatible": _read(root / "proc/device-tree/compatible").lower(),
        "cpu_model": "\n".join(models + [processor]).lower(),
        "machine": machine.lower(),
        "system": system.lower(),
    }


def _matches(rule: dict[str, tuple[str, ...]], facts: dict[str, Any], root: Path) -> bool:
    for key, values in rule.items():
        if key == "files":
            ok = any((root / v.lstrip("/")).exists() for v in values)
        elif key in ("machine", "system"):
            ok = facts[key] in (v.lower() for v in values)
        else:
            ok = any(v.lower() in facts[key] for v in values)
        if not ok:
            return False
    return True


def detect(root: str | os.PathLike[str] = "/", *, machine: str | None = None, system: str | None = None,
           processor: str | None = None) -> DeviceProfile:
    """The built-in profile that best fits this machine, else `generic`.

    The most specific matching rule (most hints) wins; ties go to the first name in
    sorted order. `root` and the platform arguments exist so tests can fake a board.
    """
    root = Path(root)
    facts = _facts(root, machine if machine is not None else platform.machine(),
                   system if system is not None else platform.system(),
                   processor if processor is not None else platform.processor())
    best, best_score = None, 0
    for name in list_profiles():
        profile = load_profile(name, root=root)
        score = max((len(r) for r in profile.detect if _matches(r, facts, root)), default=0)
        if score > best_score:
            best, best_score = profile, score
    return best or load_profile("generic", root=root)


def estimate_memory_mb(spec: ModelSpec, max_context: int, weights_bytes: int, kv_bytes_per_value: int = 4,
                       slots: int = 1) -> float:
    """Weights plus full KV caches (keys and values, every layer, `slots` requests of
    `max_context` tokens), in MiB.

    Activations and onnxruntime's arenas come on top; this is the part that grows
    with the model, the context and the requests decoded together, which is what a
    profile's limit is meant to catch. A slot's pages are resident only once written,
    so this is the ceiling a long enough run of long prompts reaches.
    """
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * max_context * kv_bytes_per_value * slots
    return (weights_bytes + kv) / 2**20


def memory_warning(profile: DeviceProfile, spec: ModelSpec, max_context: int, weights_bytes: int,
                   kv_bytes_per_value: int = 4, slots: int = 1) -> str | None:
    """A one-line warning when the estimate exceeds the profile's memory limit, else None."""
    need = estimate_memory_mb(spec, max_context, weights_bytes, kv_bytes_per_value, slots)
    if need <= profile.memory_limit_mb:
        return None
    caches = f"{slots} KV cache slots of {max_context} tokens" if slots > 1 else f"KV cache for {max_context} tokens"
    fix = "fewer --slots, a lower --max-context" if slots > 1 else "lower --max-context"
    return (f"weights + {caches} need about {need:.0f} MiB, more than profile "
            f"{profile.name!r} allows ({profile.memory_limit_mb} MiB); {fix} or use a smaller quant")
