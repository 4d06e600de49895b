"""Embedding bundles: export of sentence encoders, `edgellm.load(...).embed`, and the embedding
routes answering the real `openai` and `ollama` clients beside a generative model."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import ollama
import openai
import pytest

import edgellm
from edgellm.engine import Engine
from edgellm.errors import BundleError, ExportError, GenerationError
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from edgellm.retrieval.embed import Embedder, EmbeddingModel
from edgellm.service.http import HttpConfig
from edgellm.service.http_server import HttpServer
from edgellm.service.broker import find_mosquitto
from edgellm.service.server import Service, ServiceConfig
from embedding_helpers import cosines, make_tiny_bert, minilm_folder, reference
from mqtt_helpers import Probe, connection

TEXTS = ["The pump cavitates when the suction pressure drops below the vapour pressure.",
         "hi", "Bearing wear shows as vibration at twice the shaft speed. " * 40, ""]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_bert_pooling_as_its_config_says(tmp_path, pooling):
    folder = make_tiny_bert(tmp_path / "hf", pooling=pooling, normalize=pooling == "mean")
    manifest = export_model(folder, tmp_path / "b", quant=QuantConfig(weights="fp32"))
    assert manifest.graph.kind == "embedding" and manifest.graph.pooling == pooling
    assert manifest.quality["passed"] and manifest.quality["min_cosine"] >= 0.999
    model = edgellm.load(tmp_path / "b")
    assert isinstance(model, EmbeddingModel) and model.dimensions == 32
    vectors, tokens = model.embed_counted(TEXTS)
    want = reference(folder, TEXTS, pooling, pooling == "mean", max_tokens=64)
    assert cosines(vectors, want).min() >= 0.9999  # a batch of mixed lengths: padding changes nothing
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms, 1, atol=1e-5) if pooling == "mean" else not np.allclose(norms, 1, atol=1e-3)
    assert tokens == sum(min(len(model.tokenizer.encode(t).ids), 64) for t in TEXTS)
    assert np.allclose(model.embed(TEXTS[1]), vectors[1:2], atol=1e-5)  # alone or batched: the same vector


def test_a_bare_transformer_folder_gets_mean_pooled_unit_vectors(tmp_path):
    folder = make_tiny_bert(tmp_path / "hf", pooling="cls", normalize=False)
    (folder / "modules.json").unlink()  # no sentence-transformers config: the documented default
    manifest = export_model(folder, tmp_path / "b", quant=QuantConfig(weights="fp32"))
    assert (manifest.graph.pooling, manifest.graph.normalize) == ("mean", True)
    assert manifest.spec.max_context == 128  # max_position_embeddings, sentence_bert_config.json aside
    vectors = edgellm.load(tmp_path / "b").embed(TEXTS[:2])
    assert cosines(vectors, reference(folder, TEXTS[:2], "mean", True, max_tokens=128)).min() >= 0.9999


def test_embedding_export_refusals(tmp_path):
    folder = make_tiny_bert(tmp_path / "hf")
    with pytest.raises(ExportError, match="int8 or fp32"):
        export_model(folder, tmp_path / "b", quant=QuantConfig(weights="int4"))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ExportError, match="pooling .* is not supported"):
        export_model(folder, tmp_path / "b", quant=QuantConfig(weights="fp32"))
    assert not (tmp_path / "b").exists()


def test_cli_info_shows_the_gate_and_run_refuses_an_embedding_bundle(minilm, capsys):
    from edgellm.cli.main import main

    assert main(["info", str(minilm["int8"])]) == 0
    out = capsys.readouterr().out
    assert "mean pooling, normalised, 384 dimensions" in out and "cosine  at least 0.99" in out
    assert main(["run", str(minilm["int8"]), "hello"]) == 1
    assert "an embedding bundle, which embeds texts and generates none" in capsys.readouterr().err


def test_input_refusals_are_one_line(tmp_path):
    folder = make_tiny_bert(tmp_path / "hf")
    export_model(folder, tmp_path / "b", quant=QuantConfig(weights="fp32"), evaluate=False)
    model = edgellm.load(tmp_path / "b")
    for bad, says in (([], "at least one"), ([1], r"input\[0\] must be a string"), (["\ud800"], "lone surrogate")):
        with pytest.raises(GenerationError, match=says):
            model.embed(bad)
    with pytest.raises(GenerationError, match=r"input\[1\] is longer than the 64 tokens"):
        model.embed_counted(["short", "pump " * 100], truncate=False)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["graph"]["kind"] = "encoder"
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="graph.kind 'encoder'"):
        edgellm.load(tmp_path / "b")


def test_minilm_bundles_agree_with_sentence_transformers(minilm):
    """The done-when bar, on the library's own computation (sentence-transformers)."""
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm_folder()), device="cpu").encode(TEXTS)
    for quant, bar in (("fp32", 0.999), ("int8", 0.99)):
        model = edgellm.load(minilm[quant])
        assert cosines(model.embed(TEXTS), want).min() >= bar, quant
    assert json.loads((minilm["int8"] / "manifest.json").read_text())["quality"]["min_cosine"] >= 0.99
    # the token table (47 of the 90 MB) is int8 rows too: 26 MB in all, not 58
    assert (minilm["int8"] / "model.onnx").stat().st_size < 30e6


@pytest.fixture(scope="module")
def side_by_side(model, minilm):
    """The tiny generative bundle and the int8 MiniLM bundle behind one HTTP server."""
    engine = Engine(model, queue_size=4, max_tokens=64).start()
    embedder = Embedder(edgellm.load(minilm["int8"]))
    server = HttpServer(engine, HttpConfig(port=0), embedder=embedder).start()
    try:
        yield server
    finally:
        server.stop()
        engine.close()


def test_openai_and_ollama_clients_get_the_source_models_vectors(side_by_side, minilm, model):
    want = reference(minilm_folder(), TEXTS)
    client = openai.OpenAI(base_url=side_by_side.url + "/v1", api_key="x", max_retries=0)
    got = client.embeddings.create(model="int8", input=TEXTS)  # base64 on the wire: the client's default
    assert [d.index for d in got.data] == [0, 1, 2, 3] and got.usage.prompt_tokens > 256
    assert cosines([d.embedding for d in got.data], want).min() >= 0.99
    floats = client.embeddings.create(model="int8", input=TEXTS[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, got.data[0].embedding, atol=1e-6)
    olla = ollama.Client(host=side_by_side.url, timeout=60)
    embedded = olla.embed(model="int8", input=TEXTS)
    assert cosines(embedded.embeddings, want).min() >= 0.99 and embedded.prompt_eval_count == got.usage.prompt_tokens
    legacy = olla.embeddings(model="int8:latest", prompt=TEXTS[0])
    assert cosines([legacy.embedding], want[:1]).min() >= 0.99
    chat = client.chat.completions.create(model=model.manifest.name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3)  # the generative model still answers beside it
    assert chat.choices[0].finish_reason == "length"


def test_embedding_route_refusals(side_by_side, model):
    url = side_by_side.url
    for path, body, status, says in (
            ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "token ids are not accepted"),
            ("/v1/embeddings", {"input": "x", "model": model.manifest.name}, 404, "serves no embeddings"),
            ("/v1/embeddings", {"input": "x", "dimensions": 8}, 400, "have 384"),
            ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "float or base64"),
            ("/v1/embeddings", {"input": []}, 400, "at least one"),
            ("/api/embed", {"input": ["a", "pump " * 400], "truncate": False}, 400, r"input\[1\] is longer"),
            ("/api/embeddings", {"prompt": 3}, 400, "prompt must be a string")):
        response = httpx.post(url + path, json=body, timeout=30)
        message = response.json()["error"]
        message = message if isinstance(message, str) else message["message"]
        assert response.status_code == status and re.search(says, message), (path, response.text)


def test_no_embedding_model_is_a_404(model):
    engine = Engine(model, queue_size=2).start()
    server = HttpServer(engine, HttpConfig(port=0)).start()
    try:
        response = httpx.post(server.url + "/api/embed", json={"input": "x"}, timeout=10)
        assert response.status_code == 404 and "--embedding" in response.json()["error"]
    finally:
        server.stop()
        engine.close()


@pytest.mark.timeout(180)
def test_serve_runs_both_bundles_from_one_process(tiny_bundle, minilm, tmp_path):
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--http", "127.0.0.1:0",
           "--embedding", str(minilm["fp32"]), "--threads", "1"]
    with log.open("w") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=sink, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"over HTTP at (http://127\.0\.0\.1:\d+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        client = openai.OpenAI(base_url=found.group(1) + "/v1", api_key="x", max_retries=0)
        got = client.embeddings.create(model="fp32", input=TEXTS)
        assert cosines([d.embedding for d in got.data], reference(minilm_folder(), TEXTS)).min() >= 0.999
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    wrong = subprocess.run([sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--http", "127.0.0.1:0",
                            "--embedding", str(tiny_bundle)], capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "not an embedding one" in wrong.stderr


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
def test_mqtt_embed_request(broker, model, minilm):
    embedder = Embedder(edgellm.load(minilm["int8"]))
    conn = connection(broker.url)
    service = Service(model, conn, ServiceConfig(device_id="emb", reconnect_min_s=0.2, reconnect_max_s=1.0),
                      embedder=embedder).start()
    probe = Probe(conn, "probe-embed", topics=("edgellm/emb/response/#", "mine/#", "edgellm/emb/status"))
    try:
        assert service.connected.wait(10)
        status = probe.wait(lambda m: m.topic == "edgellm/emb/status")
        assert json.loads(status.payload)["capabilities"]["embedding"] == "int8"
        probe.publish("edgellm/emb/embed", {"id": "e1", "input": TEXTS, "reply_to": "mine/e1"})
        reply = probe.replies("e1", timeout=30)[-1]
        assert reply["done"] and reply["model"] == "int8" and reply["usage"]["prompt_tokens"] > 256
        assert cosines(reply["embeddings"], reference(minilm_folder(), TEXTS)).min() >= 0.99
        for rid, body, says in (("e2", {"input": [1]}, "non-empty list of strings"),
                                ("e3", {"input": ["x"] * 33}, "at most 32"),
                                ("e4", {"input": "x", "prompt": "y"}, "unknown field 'prompt'"),
                                ("e5", {"input": "\ud800"}, "lone surrogate")):
            probe.publish("edgellm/emb/embed", json.dumps({"id": rid, **body}))
            error = probe.replies(rid, timeout=30)[-1]
            assert error["status"] == "error" and says in error["error"]["message"], error
        embedder.max_waiting = 0  # every place to wait taken: refused at once, no thread started
        threads = threading.active_count()
        probe.publish("edgellm/emb/embed", json.dumps({"id": "e6", "input": "x"}))
        busy = probe.replies("e6", timeout=30)[-1]
        assert busy["error"]["code"] == "busy" and threading.active_count() == threads
    finally:
        probe.close()
        service.stop()
