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


KV_DTYPES = ("float32", "float16", "int8")  # int8: GroupQueryAttention quantizes new rows itself
# How a graph's cache is laid out, by its kind and target (the cache and runner that bind it:
# runtime/caches.py cache_for, runtime/runner.py open_runner).
LAYOUTS = {
    "generic": "dynamic",  # optimum: present is past plus the new rows, a grown copy every step
    "cpu": "static",  # [1, kv_heads, capacity, head_dim], written in place; cache slots batch it
    "cuda": "static",
    "openvino": "append",  # [1, capacity, kv_heads, head_dim], present is only the new rows
    "qnn": "fixed",  # one token a step over the whole context fixed at export
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Graph:
    """The manifest's `graph` section, parsed and checked once (`from_dict`): the one place the
    runtime learns how to run a bundle's graph. Absent fields read as the first exports wrote them.

    kind: "fast" (edgellm's GroupQueryAttention graph), "generic" (an optimum export) or
    "embedding" (a sentence encoder, edgellm.retrieval.embed). target: what the graph's ops and
    dtypes were chosen for ("cpu"; "cuda": float16 activations; "openvino": standard-op attention
    and a sequence-major cache; "qnn": a static one-token step over `context` cache rows).
    batch: exported with a batch dimension, so several cache slots decode in one step.
    block_sums: some int4/int8 matmul reads the activations' block sums appended to them (an
    exact Q4_1/Q4_K import's offsets): its activations must be quantized per block
    (providers.session_options).
    """

    kind: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    target: str = "cpu"
    kv_dtype: str = "float32"
    batch: bool = False
    context: int | None = None  # qnn: the cache rows, fixed in the graph's shapes
    pooling: str | None = None  # embedding: "mean" | "cls", inside the graph
    normalize: bool = False  # embedding: unit vectors, inside the graph
    dimensions: int | None = None  # embedding: the vector's length
    block_sums: bool = False

    @property
    def layout(self) -> str:
        """The cache layout ("dynamic", "static", "append", "fixed"; see LAYOUTS); "" for an encoder."""
        if self.kind == "embedding":
            return ""
        return LAYOUTS["generic" if self.kind == "generic" else self.target]

    @property
    def takes_slots(self) -> bool:
        """Whether cache slots (caches.SlotCache) can run it: a fast graph with the head-major
        cache; several of them in one step only where it has a `batch` dimension too."""
        return self.layout == "static"

    @property
    def fixed_context(self) -> int | None:
        """The context a graph's shapes fix (qnn); None where the caller chooses it."""
        return self.context if self.layout == "fixed" else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "file": self.file, "inputs": list(self.inputs),
                                "outputs": list(self.outputs)}
        if self.kind == "embedding":
            data.update(pooling=self.pooling, normalize=self.normalize, dimensions=self.dimensions)
            return data
        data.update(kv_dtype=self.kv_dtype, batch=self.batch)
        if self.target != "cpu":
            data["target"] = self.target
        if self.context is not None:
            data["context"] = self.context
        if self.block_sums:
            data["block_sums"] = True
        return data

    @classmethod
    def from_dict(cls, graph: dict[str, Any], where: str = MANIFEST) -> "Graph":
        """Check the section and return it frozen; BundleError names the first bad field."""
        if graph.get("kind") not in GRAPH_KINDS:
            raise BundleError(f"{where}: graph.kind {graph.get('kind')!r} is not one of {GRAPH_KINDS}")
        for key in ("file", "inputs", "outputs"):
            if key not in graph:
                raise BundleError(f"{where}: field 'graph.{key}' is missing")
        _check_name(graph["file"], where, "graph.file")
        for key in ("inputs", "outputs"):
            names = graph[key]
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise BundleError(f"{where}: graph.{key} must be a list of names, got {names!r}")
        for key in ("batch", "block_sums"):
            if not isinstance(graph.get(key, False), bool):
                raise BundleError(f"{where}: graph.{key} must be true or false, got {graph[key]!r}")
        if graph.get("target", "cpu") not in GRAPH_TARGETS:
            raise BundleError(f"{where}: graph.target {graph['target']!r} is not one of {GRAPH_TARGETS}")
        if graph.get("kv_dtype", "float32") not in KV_DTYPES:
            raise BundleError(f"{where}: graph.kv_dtype {graph['kv_dtype']!r} is not one of {KV_DTYPES}")
        context = graph.get("context")
        if graph.get("target") == "qnn" and (not _is_int(context) or context < 2):
            raise BundleError(f"{where}: graph.context must be an integer >= 2 for target qnn, got {context!r}")
        dimensions = graph.get("dimensions")
        if graph["kind"] == "embedding" and (not _is_int(dimensions) or dimensions < 1):
            raise BundleError(f"{where}: graph.dimensions must be a positive integer, got {dimensions!r}")
        return cls(kind=graph["kind"], file=graph["file"], inputs=tuple(graph["inputs"]),
                   outputs=tuple(graph["outputs"]), target=graph.get("target", "cpu"),
                   kv_dtype=graph.get("kv_dtype", "float32"), batch=graph.get("batch", False),
                   context=context if _is_int(context) else None, pooling=graph.get("pooling"),
                   normalize=bool(graph.get("normalize", False)), dimensions=dimensions,
                   block_sums=graph.get("block_sums", False))


@dataclass
class Manifest:
    """The parsed `manifest.json`.

    `graph` is the checked `Graph` (an exporter may pass the section as a dict: it is parsed
    here, so a bundle is held to the same rules written as read).
    `quantization` holds: weights ("int4" | "int8" | "fp16" | "fp32"), block_size,
    symmetric, accuracy_level, and per-tensor notes (e.g. GGUF blocks imported exactly).
    `generation` holds: bos_token_id, eos_token_ids, pad_token_id and default sampling.
    `files` maps every other file of the bundle (the graph and its external data
    included) to its sha256.
    """

    spec: ModelSpec
    graph: Graph
    quantization: dict[str, Any]
    generation: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.graph, dict):
            self.graph = Graph.from_dict(self.graph)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "source": self.source,
            "spec": self.spec.to_dict(),
            "graph": self.graph.to_dict(),
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
        files = data["files"]
        for name, digest in files.items():
            _check_name(name, where, "files entry")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise BundleError(f"{where}: files[{name!r}] must be a sha256 in lowercase hex, got {digest!r}")
        graph = Graph.from_dict(data["graph"], where)
        if graph.file not in files:
            raise BundleError(f"{where}: graph.file {graph.file!r} is not in the checksummed files list")
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
    """The file's sha256, read through one buffer: a fresh 1 MB bytes object a read, freed each
    time, makes glibc raise its mmap threshold, and onnxruntime's load then leaves its freed
    staging buffers in the heap (Qwen2.5-0.5B shape: load peak 605 -> 648-664 MB when verified)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
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
