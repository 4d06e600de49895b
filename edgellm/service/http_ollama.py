"""The Ollama subset Home Assistant's Ollama integration and the `ollama` Python client use.

/api/chat and /api/generate stream NDJSON by default; `options` are translated onto
the parameters of params.py (num_predict -> max_tokens, repeat_penalty ->
repetition_penalty, repeat_last_n -> penalty_window) and validated there; `think`
false is reasoning "off", true "separate" (the think block goes out as `thinking`);
`format` "json" or a JSON schema holds the answer to it; a top-level `cache_salt` is
vLLM's (the prompt cache scoped further than the client), a top-level `retrieval` edgellm's
(the final object's top-level `citations` are its sources). `num_ctx` and `keep_alive`
are accepted and ignored: the context is the one `serve` loaded (Home Assistant sends
num_ctx 8192 by default; a prompt longer than the loaded context is refused with 400),
and the model stays loaded while the server runs. Errors are Ollama's `{"error": "..."}`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..errors import GenerationError
from ..messages import check_messages
from ..params import BY_WIRE, WIRE, from_wire
from ..sequence import Result
from .http import Front, HttpError, Run, bad_request, outcome_error

log = logging.getLogger("edgellm.service")

# The Ollama API release this subset follows (what /api/version reports; edgellm's own is beside it).
OLLAMA_API = "0.11.0"
# options field -> parameter wire field.
_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repeat_last_n": "penalty_window"}
# Each parameter as an Ollama request spells it, for errors; a schema's own path
# ("response_format.json_schema.schema.properties...") is under `format`.
NAMES = {**WIRE, **{BY_WIRE[wire].name: f"options.{name}" for name, wire in _OPTIONS.items()},
         "response_format": "format", "response_format.json_schema.schema": "format", "reasoning": "think"}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _params(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise HttpError(400, f"options must be an object, got {type(options).__name__}")
    wire = {_OPTIONS[k]: v for k, v in options.items() if k in _OPTIONS and v is not None}
    # Ollama's "no limit" (-1) and "fill the context" (-2), and repeat_last_n 0 (off) and -1 (num_ctx).
    if wire.get("max_tokens") in (-1, -2):
        del wire["max_tokens"]
    if isinstance(wire.get("penalty_window"), int) and wire["penalty_window"] in (0, -1):
        del wire["penalty_window"]
    fmt = body.get("format")
    if fmt == "json":
        wire["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        wire["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise HttpError(400, f'format must be "json" or a JSON schema object, got {str(fmt)[:60]}')
    think = body.get("think")
    if think is not None:
        if think not in (True, False, "high", "medium", "low"):
            raise HttpError(400, f'think must be true, false, "high", "medium" or "low", got {think!r}')
        wire["reasoning"] = "off" if think is False else "separate"
    for name in ("cache_salt", "retrieval"):  # edgellm's and vLLM's fields, at the top: not Ollama options
        if body.get(name) is not None:
            wire[name] = body[name]
    if body.get("tools"):
        wire["tools"] = [_without_nulls(t) for t in body["tools"]] if isinstance(body["tools"], list) \
            else body["tools"]
    try:
        return from_wire(wire)
    except GenerationError as exc:
        raise bad_request(exc, NAMES) from None


def _without_nulls(value: Any) -> Any:
    """The `ollama` client writes unset fields of a tool as null; OpenAI's shape leaves them out."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama messages in OpenAI's shape: calls get ids and JSON-text arguments, and each
    tool result (named by `tool_name`) answers the earliest open call of that name."""
    if not isinstance(raw, list) or not raw:
        raise HttpError(400, "messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise HttpError(400, f"messages[{i}] must be an object with role and content")
        if m.get("images"):
            raise HttpError(400, f"messages[{i}].images: this model reads text only")
        m = {k: v for k, v in m.items() if v is not None and k not in ("images", "thinking", "tool_name")}
        m.setdefault("content", "")
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_call(c, f"call_{i}_{j}", f"messages[{i}].tool_calls[{j}]")
                               for j, c in enumerate(m["tool_calls"])]
            open_calls += [(c["id"], c["function"]["name"]) for c in m["tool_calls"]]
        if m.get("role") == "tool" and "tool_call_id" not in m and open_calls:
            name = raw[i].get("tool_name") or m.get("name")
            match = next((c for c in open_calls if c[1] == name), open_calls[0])
            open_calls.remove(match)
            m["tool_call_id"], m["name"] = match
        out.append(m)
    try:
        return check_messages(out)
    except GenerationError as exc:
        raise HttpError(400, str(exc)) from None


def _call(call: Any, default_id: str, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise HttpError(400, f"{where} must be {{function: {{name, arguments}}}}")
    args = fn.get("arguments", {})
    return {"id": call.get("id") or default_id, "type": "function",
            "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI calls in Ollama's shape (arguments as an object); a call cut short by the
    token budget has no valid arguments and is left out (logged)."""
    out = []
    for call in calls:
        try:
            args = json.loads(call["function"]["arguments"])
        except json.JSONDecodeError:
            log.info("dropped tool call %s: its arguments are incomplete JSON", call["id"])
            continue
        out.append({"id": call["id"], "function": {"index": len(out), "name": call["function"]["name"],
                                                   "arguments": args}})
    return out


def _done(front: Front, result: Result, **fields: Any) -> dict[str, Any]:
    u = result.usage
    decode_s = (u.completion_tokens - 1) / u.decode_tokens_per_s if u.decode_tokens_per_s else 0.0
    return {"model": front.tag, "created_at": _now(), **fields, "done": True,
            "done_reason": "length" if result.finish_reason == "length" else "stop",
            "total_duration": int((u.ttft_s + decode_s) * 1e9), "load_duration": 0,
            "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": int(u.ttft_s * 1e9),
            "eval_count": u.completion_tokens, "eval_duration": int(decode_s * 1e9),
            **({"citations": result.citations} if result.citations else {})}


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise HttpError(400, f"stream must be true or false, got {stream!r}")
    return stream


def _line(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"


async def _ndjson(front: Front, run: Run, chat: bool) -> AsyncIterator[str]:
    """One line per chunk; the tool calls, whole, on a line of their own before the final one."""
    try:
        async for chunk in run.chunks():
            if chunk.text or chunk.reasoning:
                yield _line({"model": front.tag, "created_at": _now(), **_part(chat, chunk.text, chunk.reasoning),
                             "done": False})
        if run.outcome.error is not None:
            yield _line({"error": str(outcome_error(run.outcome, NAMES))})
            return
        result = run.outcome.last.result
        if whole := _ollama_calls(result.tool_calls):
            yield _line({"model": front.tag, "created_at": _now(),
                         "message": {"role": "assistant", "content": "", "tool_calls": whole}, "done": False})
        yield _line(_done(front, result, **_part(chat, "", "")))
    finally:
        run.cancel.set()  # the client went away (or it finished: then a no-op)


def _part(chat: bool, text: str, reasoning: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The text of a line: a message for /api/chat, `response` for /api/generate."""
    if not chat:
        return {"response": text, **({"thinking": reasoning} if reasoning else {})}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        message["thinking"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


async def _answer(front: Front, request: Request, prompt: Any, params: dict[str, Any], stream: bool,
                  chat: bool) -> Response:
    run = await front.submit(request, prompt, params, NAMES)
    if stream:
        run.unwatch()
        return StreamingResponse(_ndjson(front, run, chat), media_type="application/x-ndjson")
    result = await front.whole(run)
    return JSONResponse(_done(front, result, **_part(chat, result.text, result.reasoning,
                                                     _ollama_calls(result.tool_calls))))


async def chat(front: Front, request: Request) -> Response:
    body = await front.read_json(request)
    front.check_model(body.get("model"))
    messages = _messages(body.get("messages"))
    params = _params(body)
    return await _answer(front, request, messages, params, _stream_flag(body), chat=True)


async def generate(front: Front, request: Request) -> Response:
    body = await front.read_json(request)
    front.check_model(body.get("model"))
    for name in ("images", "suffix", "template", "context"):
        if body.get(name):
            raise HttpError(400, f"{name} is not supported by this server; use /api/chat for a conversation")
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or not isinstance(system, (str, type(None))):
        raise HttpError(400, "prompt and system must be strings")
    params = _params(body)
    stream = _stream_flag(body)
    if not prompt:  # how Ollama clients load a model: it is loaded already
        return JSONResponse({"model": front.tag, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    if body.get("raw"):
        text: Any = prompt
    else:
        text = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]
    return await _answer(front, request, text, params, stream, chat=False)


def _details(front: Front, manifest: Any = None) -> dict[str, Any]:
    manifest = manifest or front.model.manifest
    arch = manifest.spec.arch
    return {"parent_model": "", "format": "onnx", "family": arch, "families": [arch], "parameter_size": "",
            "quantization_level": str(manifest.quantization.get("weights", ""))}


def _card(front: Front, model: Any = None) -> dict[str, Any]:
    """The served model's card (or `model`'s: the embedding one `serve --embedding` serves beside it)."""
    model = model or front.model
    manifest = model.manifest
    tag = front.tag if model is front.model else model.name if ":" in model.name else f"{model.name}:latest"
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()
    root = getattr(model, "path", None)
    size = sum((root / name).stat().st_size for name in manifest.files) if root is not None else 0
    modified = dt.datetime.fromtimestamp(front.started, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": tag, "model": tag, "modified_at": modified, "size": size, "digest": digest,
            "details": _details(front, manifest)}


async def tags(front: Front, _request: Request) -> Response:
    embedding = [_card(front, front.embedder.model)] if front.embedder is not None else []
    return JSONResponse({"models": [_card(front), *embedding]})


async def ps(front: Front, _request: Request) -> Response:
    # Loaded for as long as the server runs; Ollama writes "forever" as a far date.
    card = {**_card(front), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
            "context_length": front.model.max_context}
    return JSONResponse({"models": [card]})


async def version(_front: Front, _request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_API, "edgellm": __version__})


async def show(front: Front, request: Request) -> Response:
    body = await front.read_json(request)
    front.check_model(body.get("model", body.get("name")))
    model = front.model
    capabilities = ["completion"]
    if "tools" in model.template.source:
        capabilities.append("tools")
    if model.conventions.markers is not None:
        capabilities.append("thinking")
    arch = model.manifest.spec.arch
    return JSONResponse({"modelfile": "", "parameters": "", "template": model.template.source,
                         "details": _details(front), "capabilities": capabilities,
                         "model_info": {"general.architecture": arch, f"{arch}.context_length": model.max_context},
                         "modified_at": _card(front)["modified_at"]})


ROUTES = [
    ("/api/chat", ["POST"], chat),
    ("/api/generate", ["POST"], generate),
    ("/api/tags", ["GET"], tags),
    ("/api/ps", ["GET"], ps),
    ("/api/version", ["GET"], version),
    ("/api/show", ["POST"], show),
]
