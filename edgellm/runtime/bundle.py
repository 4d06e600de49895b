"""The bundle format: a directory with the graph, tokenizer, chat template and manifest.

Written by `export/`, read by `edgellm.load`: one definition of the layout, the
manifest schema and the checksums. Writing goes to a temporary sibling directory
renamed into place at the end, so a failed export never leaves half a bundle.

A bundle is self-contained: every file in it is listed with its checksum, none is
a symbolic link, and every path the manifest names stays inside it, so a bundle
cannot make the runtime read (or run) anything it does not verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ..errors import BundleError
from .model_spec import ModelSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_KINDS = ("fast", "generic", "embedding")  # embedding: edgellm.retrieval.embed
GRAPH_TARGETS = ("cpu", "cuda", "openvino", "qnn")
_SHA256 = re.compile("[0-9a-f]{64}")


@dataclass
class Manifest:
    """The parsed `manifest.json`.

    `graph` holds: kind ("fast" | "generic"), file, inputs, outputs, kv_dtype,
    batch (true: the graph decodes several cache slots in one step; absent: batch 1), and
    target ("cuda": float16 activations for CUDA's kernels; "openvino": standard-op attention
    and a sequence-major cache, see kvcache.AppendCache; "qnn": a static one-token step over
    `context` cache rows, see static_step.StepRunner; absent: "cpu").
    `quantization` holds: weights ("int4" | "int8" | "fp16" | "fp32"), block_size,
    symmetric, accuracy_level, and per-tensor notes (e.g. GGUF blocks imported exactly).
    `generation` holds: bos_token_id, eos_token_ids, pad_token_id and default sampling.
    `files` maps every other file of the bundle (the graph and its external data
    included) to its sha256.
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
        if not isinstance(graph.get("batch", False), bool):
            raise BundleError(f"{where}: graph.batch must be true or false, got {graph['batch']!r}")
        if graph.get("target", "cpu") not in GRAPH_TARGETS:
            raise BundleError(f"{where}: graph.target {graph['target']!r} is not one of {GRAPH_TARGETS}")
        context = graph.get("context")
        if graph.get("target") == "qnn" and (not isinstance(context, int) or isinstance(context, bool) or context < 2):
            raise BundleError(f"{where}: graph.context must be an integer >= 2 for target qnn, got {context!r}")
        files = data["files"]
        for name, digest in files.items():
            _check_name(name, where, "files entry")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise BundleError(f"{where}: files[{name!r}] must be a sha256 in lowercase hex, got {digest!r}")
        _check_name(graph["file"], where, "graph.file")
        if graph["file"] not in files:
            raise BundleError(f"{where}: graph.file {graph['file']!r} is not in the checksummed files list")
        return cls(
            spec=spec,
            graph=graph,
            quantization=data["quantization"],
            generation=data["generation"],
            source=data.get("source", {}),
            files=files,
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


def _check_name(name: object, where: str, what: str) -> None:
    """Refuse a path that could leave the bundle or name one file two ways: bundle paths
    are relative POSIX paths without `..`, written as `files` lists them."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise BundleError(f"{where}: {what} {name!r} is not a file name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise BundleError(f"{where}: {what} {name!r} points outside the bundle")
    if path.as_posix() != name:
        raise BundleError(f"{where}: {what} {name!r} must be written {path.as_posix()!r}")


def bundle_file(root: str | os.PathLike[str], name: str) -> Path:
    """The path of the bundle file `name`, after checking that it stays inside `root`
    and reaches a regular file through no symbolic link. Everything the runtime opens
    from a bundle is resolved here. `root` itself may be a link (models/current)."""
    root = Path(root)
    _check_name(name, str(root), "file")
    path = root
    for part in PurePosixPath(name).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise BundleError(f"{path}: missing from the bundle") from None
        except OSError as exc:
            raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if stat.S_ISLNK(mode):
            raise _link_error(path)
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path}: not a regular file")
    return path


def read_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Parse a bundle's manifest and refuse a bundle that is not self-contained (a path
    outside it, a symbolic link, a file the manifest does not list); with `verify`,
    refuse it too if any file's checksum differs."""
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if not os.path.lexists(root / MANIFEST):
        raise BundleError(f"{root / MANIFEST}: missing (is {root} an edgellm bundle?)")
    path = bundle_file(root, MANIFEST)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    manifest = Manifest.from_dict(data, where=str(path))
    for name in manifest.files:
        bundle_file(root, name)
    for name, file in _bundle_files(root):
        if name != MANIFEST and name not in manifest.files:
            raise BundleError(f"{file}: not in {MANIFEST}'s files list, so it cannot be verified; "
                              f"delete it (copy tools add some, like .DS_Store) or re-export the bundle")
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: str | os.PathLike[str], manifest: Manifest) -> list[str]:
    """Check every listed file's sha256; the names checked (all of `manifest.files`)."""
    for name, expected in manifest.files.items():
        path = bundle_file(root, name)
        if sha256_file(path) != expected:
            raise BundleError(f"{path}: checksum mismatch (file changed or corrupt)")
    return sorted(manifest.files)


def _bundle_files(root: Path) -> list[tuple[str, Path]]:
    """(name as `files` lists it, path) of every file under `root`, refusing symbolic
    links and anything that is neither a file nor a directory."""
    found = []
    for folder, dirs, names in os.walk(root):  # lists links to folders without entering them
        for entry in sorted(dirs + names):
            path = Path(folder) / entry
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise _link_error(path)
            if stat.S_ISREG(mode):
                found.append((path.relative_to(root).as_posix(), path))
            elif not stat.S_ISDIR(mode):
                raise BundleError(f"{path}: not a regular file; a bundle holds plain files only")
    return sorted(found)


def _link_error(path: Path) -> BundleError:
    # A link could point anywhere, and what it points to can change after verification.
    return BundleError(f"{path}: a symbolic link; a bundle holds plain files only "
                       f"(put the file itself there, or re-export the bundle)")


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
    manifest.files = {name: sha256_file(path) for name, path in _bundle_files(root) if name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return manifest
