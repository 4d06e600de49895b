"""Bundle integrity: every path inside the bundle, no symbolic links, every file listed and verified."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import edgellm
from edgellm.runtime.bundle import MANIFEST, Manifest, bundle_file, bundle_writer, finalize_manifest, read_manifest, verify_files
from edgellm.errors import BundleError
from edgellm.text import ChatTemplate, Tokenizer


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle, free to tamper with."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def edit_manifest(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((root / MANIFEST).read_text())
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


def refused(root: Path, match: str, verify: bool = True) -> None:
    with pytest.raises(BundleError, match=match):
        read_manifest(root, verify=verify)


def test_an_exported_bundle_verifies_every_file_it_holds(bundle):
    manifest = read_manifest(bundle)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert verify_files(bundle, manifest) == [n for n in on_disk if n != MANIFEST]
    assert manifest.graph.file in manifest.files
    assert {"model.onnx.data", "tokenizer.json", "chat_template.jinja"} <= set(manifest.files)


@pytest.mark.parametrize("name", ["../outside/model.onnx", "{outside}/model.onnx", "sub/../../outside/model.onnx"])
def test_a_graph_outside_the_bundle_is_refused_before_it_runs(bundle, name):
    outside = bundle.parent / "outside"
    outside.mkdir()
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")
    shutil.copy(bundle / "model.onnx.data", outside / "model.onnx.data")
    name = name.format(outside=outside)

    def point(data):
        data["graph"]["file"] = name
        data["files"][name] = data["files"]["model.onnx"]
    edit_manifest(bundle, point)
    with pytest.raises(BundleError, match=f"{MANIFEST}: files entry '{name}' points outside the bundle"):
        edgellm.load(bundle, verify=False)


def test_the_graph_must_be_a_checksummed_file(bundle):
    shutil.copy(bundle / "model.onnx", bundle / "other.onnx")
    edit_manifest(bundle, lambda d: d["graph"].update(file="other.onnx"))
    refused(bundle, "graph.file 'other.onnx' is not in the checksummed files list", verify=False)


@pytest.mark.parametrize("name, problem", [
    ("./model.onnx", "must be written 'model.onnx'"),
    ("sub//model.onnx", "must be written 'sub/model.onnx'"),
    ("", "is not a file name"),
])
def test_a_graph_path_is_spelled_one_way(bundle, name, problem):
    edit_manifest(bundle, lambda d: d["graph"].update(file=name))
    refused(bundle, f"graph.file '{name}' {problem}", verify=False)


def test_a_files_entry_must_carry_a_sha256(bundle):
    edit_manifest(bundle, lambda d: d["files"].update({"tokenizer.json": 12}))
    refused(bundle, r"files\['tokenizer.json'\] must be a sha256")


@pytest.mark.parametrize("extra", ["notes.txt", ".DS_Store", "sub/model.onnx"])
def test_an_unlisted_file_is_refused_with_the_fix(bundle, extra):
    (bundle / extra).parent.mkdir(exist_ok=True)
    (bundle / extra).write_bytes(b"not verified")
    for verify in (True, False):
        refused(bundle, f"{bundle / extra}: not in manifest.json's files list, so it cannot be verified; "
                        "delete it", verify=verify)


@pytest.mark.parametrize("name, target", [
    ("chat_template.jinja", "/etc/passwd"),
    ("tokenizer.json", "{bundle}/tokenizer.json.real"),  # even one that stays inside
    ("model.onnx.data", "{outside}"),
])
def test_a_symbolic_link_is_refused(bundle, name, target):
    outside = bundle.parent / "outside.bin"
    outside.write_bytes((bundle / name).read_bytes())
    os.replace(bundle / name, bundle / f"{name}.real")
    os.symlink(target.format(bundle=bundle, outside=outside), bundle / name)
    edit_manifest(bundle, lambda d: d["files"].update({f"{name}.real": d["files"][name]}))
    refused(bundle, f"{bundle / name}: a symbolic link; a bundle holds plain files only", verify=False)
    with pytest.raises(BundleError, match="symbolic link"):
        bundle_file(bundle, name)


def test_the_text_files_are_opened_through_the_checked_path(tmp_path):
    (tmp_path / "tokenizer.json").symlink_to("/etc/hostname")
    (tmp_path / "chat_template.jinja").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="tokenizer.json: a symbolic link"):
        Tokenizer.from_bundle(tmp_path, {"eos_token_ids": [0]})
    with pytest.raises(BundleError, match="chat_template.jinja: a symbolic link"):
        ChatTemplate.from_bundle(tmp_path, {})


def test_a_linked_folder_inside_the_bundle_is_refused(bundle):
    (bundle / "extra").symlink_to("/etc", target_is_directory=True)
    refused(bundle, "extra: a symbolic link", verify=False)


def test_a_fifo_is_refused(bundle):
    os.mkfifo(bundle / "pipe")
    refused(bundle, "pipe: not a regular file", verify=False)


def test_the_bundle_folder_itself_may_be_a_link(bundle, tmp_path):
    (tmp_path / "current").symlink_to(bundle, target_is_directory=True)
    assert read_manifest(tmp_path / "current").files == read_manifest(bundle).files


def test_checksums_are_verified_only_when_asked(bundle):
    data = bytearray((bundle / "chat_template.jinja").read_bytes())
    data[0] ^= 1
    (bundle / "chat_template.jinja").write_bytes(bytes(data))
    refused(bundle, "chat_template.jinja: checksum mismatch")
    assert read_manifest(bundle, verify=False).name


def test_the_writer_refuses_a_link_it_could_not_verify(tmp_path, bundle):
    manifest = read_manifest(bundle)
    with pytest.raises(BundleError, match="link.txt: a symbolic link"):
        with bundle_writer(tmp_path / "out") as tmp:
            (tmp / "model.onnx").write_bytes(b"graph")
            (tmp / "link.txt").symlink_to("/etc/passwd")
            finalize_manifest(tmp, manifest)
    assert not (tmp_path / "out").exists()


def test_the_writer_lists_every_file_so_its_bundle_reads_back(tmp_path, bundle):
    manifest = Manifest.from_dict(json.loads((bundle / MANIFEST).read_text()))
    with bundle_writer(tmp_path / "out") as tmp:
        for name in ("model.onnx", "tokenizer.json", "sub/notes.txt"):
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(name)
        finalize_manifest(tmp, manifest)
    assert verify_files(tmp_path / "out", read_manifest(tmp_path / "out")) == [
        "model.onnx", "sub/notes.txt", "tokenizer.json"]
