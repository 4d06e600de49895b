"""Time to the first spoken sentence over Wyoming: what an Assist voice pipeline waits for.
(Not benchmarks/wyoming.py: run as a script, that name would shadow the wyoming package.)

    python benchmarks/voice.py BUNDLE [--turns 12] [--json out.json]

The Wyoming front (`serve --wyoming`) runs in this process on a real engine, its system
prompt (a typical Assist one) declared shared and cached by one warm-up turn; the wyoming
package's own client sends each transcript and times the first `handled-chunk` (the first
sentence, which the text-to-speech stage can start on) and the final `handled`, beside the
engine's TTFT (request to first sampled token) for the same turn. Client and server share
this process: the client's own work is in the times (small: one JSON line per sentence).

The Pi 5 column is an estimate, not a measurement: decoding a small model is bound by the
memory it reads per token (`deploy_shapes.onnx_bytes_per_token` of the graph) at the 11 GB/s
a Pi 5 sustains, and the prefill of the new turn by its arithmetic at the Pi 5's measured
int4 matmul rate (--pi5-prefill-tok-s, default 200 tok/s for a 135M model: an assumption,
say so when quoting it).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from deploy_shapes import PI5_BYTES_PER_S, onnx_bytes_per_token  # noqa: E402

# What Home Assistant's Assist sends an LLM-backed agent, in short: the persona, the rules of
# a spoken answer, and the home (areas and devices).
ASSIST_SYSTEM = (
    "You are a voice assistant for Home Assistant. Answer questions about the world truthfully. "
    "Answer in plain text, in one or two short sentences, without lists or markdown: your answer is spoken "
    "aloud. Keep it simple and to the point. The home has these areas: kitchen, living room, bedroom, office, "
    "garage. Devices: kitchen light (on), living room lamp (off), bedroom thermostat (20.5 C), office fan (off), "
    "garage door (closed), front door lock (locked)."
)
QUESTIONS = (
    "Is the garage door open?", "What temperature is the bedroom?", "Which lights are on?",
    "Should I turn on the office fan if it is hot?", "Is the front door locked?", "What can you do?",
    "Tell me something about the moon.", "How do I save energy in the kitchen?",
)


async def turn(port: int, text: str) -> dict[str, float]:
    from wyoming.asr import Transcript
    from wyoming.client import AsyncTcpClient

    async with AsyncTcpClient("127.0.0.1", port) as client:
        start = time.perf_counter()
        await client.write_event(Transcript(text=text).event())
        first = None
        while True:
            event = await client.read_event()
            if event is None:
                raise RuntimeError("the service closed the connection")
            if event.type == "handled-chunk" and first is None:
                first = time.perf_counter() - start
                first_text = event.data["text"]
            if event.type in ("handled", "not-handled"):
                if event.type == "not-handled":
                    raise RuntimeError(f"not handled: {event.data.get('text')}")
                return {"first_chunk_s": first, "handled_s": time.perf_counter() - start, "first_text": first_text}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--threads", type=int)
    p.add_argument("--pi5-prefill-tok-s", type=float, default=200.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import edgellm
    from edgellm.engine import Engine
    from edgellm.service.wyoming import WyomingConfig, WyomingServer

    machine = report.machine_info()
    report.warn_if_busy(machine)
    model = edgellm.load(args.bundle, threads=args.threads)
    system_tokens = model.share_prefix([{"role": "system", "content": ASSIST_SYSTEM}])
    engine = Engine(model).start()
    usages: list[Any] = []
    engine.observers.append(lambda outcome: usages.append(outcome.last.usage))
    server = WyomingServer(engine, model.manifest.name, WyomingConfig(port=0, system=ASSIST_SYSTEM)).start()
    rows = []
    try:
        asyncio.run(turn(server.port, "Hello."))  # warm-up: the shared system prompt's rows are cached
        usages.clear()
        for i in range(args.turns):
            text = QUESTIONS[i % len(QUESTIONS)]
            row = asyncio.run(turn(server.port, text))
            usage = usages[-1]
            first_tokens = len(model.tokenizer.encode(row.pop("first_text")))
            rows.append({**row, "ttft_s": usage.ttft_s, "prompt_tokens": usage.prompt_tokens,
                         "cached_prompt_tokens": usage.cached_prompt_tokens, "first_sentence_tokens": first_tokens,
                         "decode_tok_s": usage.decode_tokens_per_s})
            report.stage(f"turn {i + 1}: first sentence {row['first_chunk_s'] * 1000:.0f} ms")
    finally:
        server.stop()
        engine.close()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    graph = Path(args.bundle) / model.manifest.graph.file
    read = onnx_bytes_per_token(graph)["total"]
    new_tokens = med("prompt_tokens") - med("cached_prompt_tokens")
    pi5_decode_s = read / PI5_BYTES_PER_S
    pi5_first = new_tokens / args.pi5_prefill_tok_s + med("first_sentence_tokens") * pi5_decode_s
    results = {
        "machine": machine, "bundle": str(args.bundle), "turns": rows, "system_prompt_tokens": system_tokens,
        "median": {k: med(k) for k in ("first_chunk_s", "handled_s", "ttft_s", "prompt_tokens",
                                       "cached_prompt_tokens", "first_sentence_tokens", "decode_tok_s")},
        "pi5_estimate": {"bytes_per_token": read, "decode_s_per_token": pi5_decode_s,
                         "prefill_tok_s_assumed": args.pi5_prefill_tok_s, "first_chunk_s": pi5_first},
    }
    m = results["median"]
    table = "\n".join(report.grid([
        ("", "first handled-chunk", "handled", "TTFT", "prompt (cached)", "1st sentence tok", "decode tok/s"),
        ("this machine (median)", f"{m['first_chunk_s'] * 1000:.0f} ms", f"{m['handled_s'] * 1000:.0f} ms",
         f"{m['ttft_s'] * 1000:.0f} ms", f"{m['prompt_tokens']:.0f} ({m['cached_prompt_tokens']:.0f})",
         f"{m['first_sentence_tokens']:.0f}", f"{m['decode_tok_s']:.1f}"),
        ("Pi 5 (memory-bound floor)", f"{pi5_first * 1000:.0f} ms", "", "", "", "",
         f"{1 / pi5_decode_s:.0f} ({read / 1e6:.1f} MB/token at 11 GB/s)"),
    ]))
    report.emit(results, table, "", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
