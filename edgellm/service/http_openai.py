"""OpenAI's routes: /v1/chat/completions, /v1/completions, /v1/models.

A request's parameter fields are the MQTT wire fields (OpenAI's names, and edgellm's
own knobs such as top_k, min_p, reasoning, grammar under theirs), so `params.from_wire`
validates them, through OpenAI's table of names (`NAMES`: the budget is
`max_completion_tokens`, or the older `max_tokens`), and errors name the field the request used. A null field is an unset one, as in OpenAI's API. Messages pass the one
check every front runs (`messages.check_messages`) once their content parts are joined.
The think block goes out as `reasoning_content`, as llama.cpp's server does, so a voice
assistant never speaks it; a `retrieval` request's sources go out as the message's
`citations` (in a stream, on the delta that carries the finish reason).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import GenerationError
from ..messages import check_messages
from ..params import WIRE, from_wire
from .http import Front, HttpError, Run, bad_request, outcome_error

# Fields OpenAI defines that this server cannot honour: refused unless left at their default.
_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]), "n": (None, 1)}


# Fields of an answer's message that clients send back with it; nothing renders them.
_ECHOED = ("refusal", "annotations", "audio", "function_call")


# OpenAI's spelling of each parameter: the wire's, but for the newer name of the budget.
NAMES = {**WIRE, "max_new_tokens": "max_completion_tokens"}


def _names(body: dict[str, Any]) -> dict[str, str]:
    """This request's table: `NAMES`, or the wire's where the budget comes by its older name."""
    return NAMES if body.get("max_completion_tokens") is not None else WIRE


def _params(body: dict[str, Any]) -> dict[str, Any]:
    """The generation parameters of a request, validated by the one declaration in params.py."""
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name) not in allowed:
            raise HttpError(400, f"{name}={body[name]!r} is not supported by this server", param=name)
    wire = {k: v for k, v in body.items() if v is not None}
    names = _names(body)
    try:
        return from_wire(wire, names)
    except GenerationError as exc:
        raise bad_request(exc, names) from None


def _text(content: Any, where: str) -> Any:
    """A message's content parts joined into the string chat templates render."""
    if not isinstance(content, list):
        return content
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise HttpError(400, f"{where}[{i}]: only text parts are supported, got {str(part)[:60]}",
                            param="messages")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise HttpError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if (v is not None or k == "content") and k not in _ECHOED}
            m["content"] = _text(m.get("content"), f"messages[{i}].content")
        out.append(m)
    try:
        return check_messages(out)
    except GenerationError as exc:
        raise HttpError(400, str(exc), param="messages") from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise HttpError(400, "stream must be true or false and stream_options an object", param="stream")
    return stream, bool(options.get("include_usage"))


def usage(last: Any) -> dict[str, Any]:
    """OpenAI's usage object from a last chunk or a Result, with edgellm's timings beside
    (clients keep unknown fields: the openai package as `usage.model_extra`)."""
    u = last.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "ttft_s": round(u.ttft_s, 6), "decode_tokens_per_s": round(u.decode_tokens_per_s, 3)}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Reply:
    """The fields every object of one response shares."""

    def __init__(self, front: Front, kind: str, prefix: str) -> None:
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                     "model": front.name}

    def __call__(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head, "choices": choices, **extra}


async def _sse_stream(run: Run, reply: _Reply, choices: Any, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one per choice `choices(chunk, first)` makes of a chunk (none for
    an empty one, until something went out), then the usage chunk if asked for, then [DONE].
    A disconnect cancels the job at the next token."""
    extra = {"usage": None} if include_usage else {}
    try:
        first = True
        async for chunk in run.chunks():
            for choice in (made := choices(chunk, first)):
                yield _sse(reply([choice], **extra))
            first = first and not made
        if run.outcome.error is not None:
            error = outcome_error(run.outcome, run.names)
            yield _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": error.code}})
        elif include_usage:
            yield _sse(reply([], usage=usage(run.outcome.last)))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel.set()  # the client went away (or it finished: then a no-op)


def _streaming(run: Run, reply: _Reply, choices: Any, include_usage: bool) -> StreamingResponse:
    run.unwatch()
    return StreamingResponse(_sse_stream(run, reply, choices, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chat_deltas(chunk: Any, first: bool) -> list[dict[str, Any]]:
    """A chunk's choices as OpenAI streams them: the text (with the role, first), then each
    tool-call delta in a choice of its own (the name with the id, then the arguments), then
    the finish reason with an empty delta, so a client reading `tool_calls[0]` misses nothing."""
    delta: dict[str, Any] = {"role": "assistant", "content": chunk.text} if first else {}
    if chunk.text and not first:
        delta["content"] = chunk.text
    if chunk.reasoning:
        delta["reasoning_content"] = chunk.reasoning
    deltas = [delta] if delta else []
    deltas += [{"tool_calls": [call]} for call in chunk.tool_calls]
    choices = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    if chunk.finish_reason:
        last = {"citations": chunk.result.citations} if chunk.result is not None and chunk.result.citations else {}
        choices.append({"index": 0, "delta": last, "logprobs": None, "finish_reason": chunk.finish_reason})
    return choices


def _chat_choice(result: Any) -> dict[str, Any]:
    calls = result.tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": result.text if result.text or not calls else None}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    if calls:
        message["tool_calls"] = calls
    if result.citations:  # a retrieval request's sources (clients keep unknown fields: openai's model_extra)
        message["citations"] = result.citations
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}


def _text_choice(chunk: Any) -> dict[str, Any]:
    """A streamed chunk or a whole `Result`: both have text and finish_reason."""
    return {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}


def _text_chunks(chunk: Any, first: bool) -> list[dict[str, Any]]:
    return [_text_choice(chunk)] if first or chunk.text or chunk.finish_reason else []


async def _complete(front: Front, request: Request, body: dict[str, Any], prompt: Any, kinds: tuple[str, str],
                    stream_choices: Any, whole_choice: Any) -> Response:
    """Run one completion; SSE if asked (`stream_choices` makes a chunk's choices), else one object."""
    params = _params(body)
    stream, include_usage = _stream_flags(body)
    run = await front.submit(request, prompt, params, _names(body))
    prefix = "chatcmpl" if kinds[0].startswith("chat") else "cmpl"
    if stream:
        return _streaming(run, _Reply(front, kinds[0], prefix), stream_choices, include_usage)
    result = await front.whole(run)
    return JSONResponse(_Reply(front, kinds[1], prefix)([whole_choice(result)], usage=usage(result)))


async def chat_completions(front: Front, request: Request) -> Response:
    body = await front.read_json(request)
    front.check_model(body.get("model"))
    return await _complete(front, request, body, _messages(body), ("chat.completion.chunk", "chat.completion"),
                           _chat_deltas, _chat_choice)


def _prompt(body: dict[str, Any]) -> Any:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise HttpError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                    param="prompt")


async def completions(front: Front, request: Request) -> Response:
    body = await front.read_json(request)
    front.check_model(body.get("model"))
    return await _complete(front, request, body, _prompt(body), ("text_completion", "text_completion"),
                           _text_chunks, _text_choice)


def _model_card(front: Front, name: str | None = None) -> dict[str, Any]:
    return {"id": name or front.name, "object": "model", "created": int(front.started), "owned_by": "edgellm"}


def _embedding_name(front: Front) -> str | None:
    """The embedding model `serve --embedding` serves beside the generative one (None: none)."""
    return front.embedder.model.name if front.embedder is not None else None


async def models(front: Front, _request: Request) -> Response:
    names = [front.name, *filter(None, [_embedding_name(front)])]
    return JSONResponse({"object": "list", "data": [_model_card(front, name) for name in names]})


async def model(front: Front, request: Request) -> Response:
    name = request.path_params["name"]
    if name is not None and name == _embedding_name(front):
        return JSONResponse(_model_card(front, name))
    front.check_model(name)
    return JSONResponse(_model_card(front))


ROUTES = [
    ("/v1/chat/completions", ["POST"], chat_completions),
    ("/v1/completions", ["POST"], completions),
    ("/v1/models", ["GET"], models),
    ("/v1/models/{name:path}", ["GET"], model),
]
