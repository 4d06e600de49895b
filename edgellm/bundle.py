"""The bundle format: a directory with the graph, tokenizer, chat template and manifest.

Written by `export/`, read by `edgellm.load`: one definition of the layout, the
manifest schema and the checksums. Writing goes to a temporary sibling directory
renamed into place at the end, so a failed export never leaves half a bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import BundleError
from .spec import ModelSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_KINDS = ("fast", "generic")


@dataclass
class Manifest:
    """The parsed `manifest.json`.

    `graph` holds: kind ("fast" | "generic"), file, inputs, outputs, kv_dtype.
    `quantization` holds: weights ("int4" | "int8" | "fp16" | "fp32"), block_size,
    symmetric, accuracy_level, and per-tensor notes (e.g. GGUF blocks imported exactly).
    `generation` holds: bos_token_id, eos_token_ids, pad_token_id and default sampling.
    `files` maps every other file of the bundle to its sha256.
    """

    spec: ModelSpec
    graph: dict[str, Any]
    quantization: dict[str, Any]
    generation: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "source": self.source,
            "spec": self.spec.to_dict(),
            "graph": self.graph,
            "quantization": self.quantization,
            "generation": self.generation,
            "quality": self.quality,
            "exporter": self.exporter,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        for key in ("spec", "graph", "quantization", "generation", "files"):
            if not isinstance(data.get(key), dict):
                raise BundleError(f"{where}: field {key!r} is missing or not an object")
        try:
            spec = ModelSpec.from_dict(data["spec"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where}: field 'spec' is invalid: {exc}") from None
        graph = data["graph"]
        if graph.get("kind") not in GRAPH_KINDS:
            raise BundleError(f"{where}: graph.kind {graph.get('kind')!r} is not one of {GRAPH_KINDS}")
        for key in ("file", "inputs", "outputs"):
            if key not in graph:
                raise BundleError(f"{where}: field 'graph.{key}' is missing")
        return cls(
            spec=spec,
            graph=graph,
            quantization=data["quantization"],
            generation=data["generation"],
            source=data.get("source", {}),
            files=data["files"],
            exporter=data.get("exporter", {}),
            quality=data.get("quality", {}),
            name=data.get("name", ""),
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Parse a bundle's manifest; with `verify`, refuse it if any file's checksum differs."""
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing (is {root} an edgellm bundle?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    manifest = Manifest.from_dict(data, where=str(path))
    for name in manifest.files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path}: file entry {name!r} points outside the bundle")
        if not (root / name).is_file():
            raise BundleError(f"{root / name}: listed in the manifest but missing")
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        actual = sha256_file(root / name)
        if actual != expected:
            raise BundleError(f"{root / name}: checksum mismatch (file changed or corrupt)")


@contextmanager
def bundle_writer(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `out` atomically.

    The caller writes every file and finally calls `finalize_manifest`. On any
    exception the temporary directory is removed and `out` is left untouched.
    """
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out}: already exists (use --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise BundleError(f"{out}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"{out}: export wrote no {MANIFEST}")
        # mkdtemp makes the directory private (0700); a bundle is read by a service user.
        tmp.chmod(0o755)
        if out.exists():
            old = parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finalize_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Checksum every file in `root` (but the manifest) and write `manifest.json`."""
    manifest.files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return manifest
