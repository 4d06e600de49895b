"""`edgellm serve`, `edgellm ask` and `edgellm demo`: arguments and entry points the CLI wires in.

Settings come from the command line, else from the `[serve]` table of `--config`
(keys are the long option names), else from the defaults of `Connection` and
`ServiceConfig`.

`serve` runs MQTT, HTTP (`--http`), Wyoming (`--wyoming`) or several over one engine: with
`--http` or `--wyoming` and no `--broker` there is no MQTT; `--broker embedded` starts the
embedded broker as when none of them is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import signal
import socket
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any, Iterable

from .. import load
from .args import add_load_arguments, add_sampling_arguments, load_model, sampling_params
from .console import AnswerPrinter
from ..errors import RequestError
from ..params import to_wire
from ..recipes import RECIPES
from ..recipes.anomaly import AnomalyRecipe, shared_prompt
from ..recipes.config import AnomalyConfig, load_config, load_sparkplug, valid_filter
from ..service import protocol as proto
from ..service.broker import (MOSQUITTO, MQTT_VERSIONS_OF, PYTHON, BrokerError, EmbeddedBroker, embedded_kind,
                              start_embedded)
from ..service.client import ask, new_request_id
from ..service.connection import MQTT_VERSIONS, BrokerAddress, Connection, parse_address, read_password
from .demo import DEFAULT_BUNDLE, DEFAULT_PROMPT, DEMO_SYSTEM, ensure_bundle, local_service
from ..service.server import Service, ServiceConfig, engine_for

log = logging.getLogger("edgellm.service")

# Options a `[serve]` table may set, by argparse dest.
_CONFIG_KEYS = (
    "broker", "device_id", "topic_prefix", "client_id", "username", "password_file", "tls_ca", "tls_cert",
    "tls_key", "mqtt_version", "shared_group", "queue_size", "session_expiry", "max_payload", "max_tokens",
    "queue_per_client", "reasoning_topic", "http", "api_key_file", "http_max_body", "slots", "shared_system",
)
_CONFIG_KEYS += ("http_allow_origin", "http_server_name", "http_max_connections", "http_read_timeout")
_CONFIG_KEYS += ("ha_discovery", "wyoming")
_INT_KEYS = ("queue_size", "session_expiry", "max_payload", "max_tokens", "queue_per_client", "http_max_body",
             "slots", "http_max_connections")
_FLOAT_KEYS = ("http_read_timeout",)
_LIST_KEYS = ("http_allow_origin", "http_server_name")  # a string (comma-separated) or a list of strings
EMBEDDED = "embedded"  # --broker value: start the embedded broker even next to --http


def _default_device_id() -> str:
    """The host name, reduced to characters that are safe in one topic level."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "edge"


def _add_connection_arguments(p: argparse.ArgumentParser, serve: bool) -> None:
    """The broker flags `serve` and `ask` share; `serve` picks whose words the help shows."""
    g = p.add_argument_group("broker")
    if serve:
        g.add_argument("--broker", help=f"mqtt://host[:1883] or mqtts://host[:8883]; '{EMBEDDED}' starts a broker "
                                        "on this host (the default without --http)")
        g.add_argument("--device-id", help="this device's topic level (default: host name)")
    else:
        g.add_argument("--broker", help="mqtt://host[:1883] or mqtts://host[:8883] (default: mqtt://127.0.0.1:1883, "
                                        "where `edgellm serve` starts its broker when 1883 is free)")
        g.add_argument("--device-id", help="the serving device's --device-id (default: this host's name)")
    g.add_argument("--topic-prefix", help="first topic level (default: edgellm)")
    g.add_argument("--username")
    g.add_argument("--password-file", help="file whose first line is the password (kept off the command line)")
    g.add_argument("--tls-ca", help="CA certificate to verify the broker (implies TLS)")
    g.add_argument("--tls-cert", help="client certificate, for brokers that require one")
    g.add_argument("--tls-key", help="client certificate's private key")
    g.add_argument("--mqtt-version", choices=sorted(MQTT_VERSIONS),
                   help="default: 5" if serve else "default: 5, or 3.1.1 when the broker refuses 5")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_load_arguments(p)
    _add_connection_arguments(p, serve=True)
    p.add_argument("--config", type=Path, help="TOML file with a [serve] table of these options "
                                               "(and an [anomaly] table for --recipe anomaly)")
    p.add_argument("--recipe", choices=RECIPES,
                   help="also run this recipe, a client of this service, in the same process "
                        "(settings: its table in --config; see docs/anomaly.md)")
    p.add_argument("--embedding", type=Path, metavar="BUNDLE",
                   help="also serve this embedding bundle (`edgellm export` of a sentence encoder) on the "
                        "embedding routes: /v1/embeddings, /api/embed, /api/embeddings (docs/retrieval.md)")
    p.add_argument("--index", action="append", metavar="NAME=FILE",
                   help="serve this document index (edgellm index) as NAME: a request's retrieval "
                        "{\"index\": NAME, \"k\": K} answers from its K chunks nearest the question, cited "
                        "(repeatable; needs --embedding, the bundle the index was built with; docs/retrieval.md)")
    g = p.add_argument_group("service")
    g.add_argument("--client-id", help="MQTT client id (default: edgellm-DEVICE; keep it stable to keep the session)")
    g.add_argument("--shared-group", help="share requests with other services via $share/NAME/...")
    g.add_argument("--queue-size", type=int, help="requests that may wait; more are answered 'busy' (default: 8)")
    g.add_argument("--session-expiry", type=int,
                   help="seconds the broker keeps requests for us while offline (default: 3600)")
    g.add_argument("--max-payload", type=int, help="largest request in bytes (default: 65536)")
    g.add_argument("--max-tokens", type=int,
                   help="the most tokens one request may ask for; more is refused (default: 1024)")
    g.add_argument("--queue-per-client", type=int,
                   help="requests one reply topic may have waiting, so one device cannot fill the queue "
                        "(default: half of --queue-size)")
    g.add_argument("--reasoning-topic",
                   help="also publish every request's reasoning (think block) here, for an audit log")
    g.add_argument("--slots", type=int,
                   help="requests decoded together, one batched step for all (default: the profile's, else 1); "
                        "each slot holds its own KV cache of --max-context tokens")
    g.add_argument("--shared-system", metavar="TEXT",
                   help="the system prompt this service's clients send: its cached rows serve every client; "
                        "the rest of each prompt is reused only by the client that sent it (docs/mqtt.md)")
    g.add_argument("--ha-discovery", nargs="?", const="homeassistant", metavar="PREFIX",
                   help="announce this service (and the anomaly recipe's machines) to Home Assistant by MQTT "
                        "discovery under PREFIX (default: homeassistant); docs/home-assistant.md")
    w = p.add_argument_group("wyoming (needs edgellm[wyoming]; see docs/home-assistant.md)")
    w.add_argument("--wyoming", metavar="HOST:PORT",
                   help="also serve Home Assistant Assist's language stage over Wyoming (handle) here (HOST defaults "
                        "to 127.0.0.1; Home Assistant's usual port is 10400); without --broker, no MQTT. The "
                        "system prompt is --shared-system, else a short spoken-answer one")
    h = p.add_argument_group("http (needs edgellm[http]; see docs/http.md)")
    h.add_argument("--http", metavar="HOST:PORT",
                   help="also serve OpenAI- and Ollama-compatible HTTP here (HOST defaults to 127.0.0.1); "
                        "without --broker, HTTP only")
    h.add_argument("--api-key-file", help="file of bearer keys HTTP clients must send, one per line, each key "
                                          "its own tenant (kept off the command line; # comments and blank "
                                          "lines ignored)")
    h.add_argument("--http-max-body", type=int, help="largest HTTP request body in bytes (default: 1048576)")
    h.add_argument("--http-allow-origin", action="append", metavar="ORIGIN",
                   help="web page origin (scheme://host[:port], or *) allowed to call the API from a browser; "
                        "repeat or separate with commas (default: none, requests with an Origin are refused)")
    h.add_argument("--http-server-name", action="append", metavar="NAME",
                   help="a DNS name clients reach this server by, accepted as Host without an API key (IP "
                        "addresses, localhost and this host's name always are); repeat or separate with commas")
    h.add_argument("--http-max-connections", type=int,
                   help="open HTTP connections at most (a quarter per client address); more are answered 503 "
                        "(default: 64, lowered to fit the file descriptor limit)")
    h.add_argument("--http-read-timeout", type=float, metavar="SECONDS",
                   help="a request's headers and body must arrive within this time, or the connection is closed "
                        "(default: 20)")


def add_ask_arguments(p: argparse.ArgumentParser) -> None:
    _add_connection_arguments(p, serve=False)
    p.add_argument("prompt")
    add_sampling_arguments(p)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply (default: 120)")
    p.add_argument("--json", action="store_true", help="print every reply payload as one JSON line")


def _apply_config(args: argparse.Namespace) -> None:
    """Fill options left unset on the command line from the `[serve]` table of --config."""
    path = getattr(args, "config", None)
    if path is None:
        return
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("serve", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    if not isinstance(table, dict):
        raise ValueError(f"--config {path}: [serve] must be a table")
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in _CONFIG_KEYS:
            raise ValueError(f"--config {path}: unknown key serve.{key}")
        if dest == "mqtt_version":
            value = str(value)
        if dest in _LIST_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        wanted, what = ((int, "an integer") if dest in _INT_KEYS else ((int, float), "a number") if dest in _FLOAT_KEYS
                        else (str, "a string"))
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ValueError(f"--config {path}: serve.{key} must be {what}")
        if getattr(args, dest, None) is None:
            setattr(args, dest, [value] if dest in _LIST_KEYS else value)


def _connection(args: argparse.Namespace, broker: str) -> Connection:
    password = read_password(args.password_file) if args.password_file else None
    return Connection(
        broker=BrokerAddress.parse(broker),
        mqtt_version=args.mqtt_version or "5",
        username=args.username,
        password=password,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def _topics(args: argparse.Namespace) -> proto.Topics:
    return proto.Topics(args.topic_prefix or "edgellm", args.device_id or _default_device_id())


def _service_config(args: argparse.Namespace, topics: proto.Topics) -> ServiceConfig:
    names = ("client_id", "shared_group", "queue_size", "session_expiry", "max_payload", "max_tokens", "queue_per_client",
             "reasoning_topic", "slots")
    given = {k: getattr(args, k) for k in names}
    if given["slots"] is None and getattr(args, "profile", None):
        from ..runtime.devices import load_profile

        given["slots"] = load_profile(args.profile).slots
    for key, low in (("queue_size", 1), ("max_payload", 1), ("session_expiry", 0), ("max_tokens", 1),
                     ("queue_per_client", 1), ("slots", 1)):
        if given[key] is not None and given[key] < low:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {low}, got {given[key]}")
    given["per_client"] = given.pop("queue_per_client")
    return ServiceConfig(device_id=topics.device, topic_prefix=topics.prefix,
                         **{k: v for k, v in given.items() if v is not None})


def _embedded_version(kind: str, args: argparse.Namespace) -> str:
    """The MQTT version the service speaks to the embedded broker of `kind`; refuses what it lacks."""
    spoken = MQTT_VERSIONS_OF[kind]
    if kind == PYTHON:
        why = "the in-process Python broker (amqtt, used when mosquitto is not installed)"
        fix = "install mosquitto or pass --broker mqtt://HOST:1883"
        if args.mqtt_version not in (None, *spoken):
            only = " and ".join(spoken)
            raise BrokerError(f"--mqtt-version {args.mqtt_version}: {why} speaks MQTT {only} only; {fix}")
        if args.shared_group:
            raise BrokerError(f"--shared-group: {why} has no shared subscriptions; {fix}")
    return args.mqtt_version or spoken[0]


def _embedded_broker(kind: str, asked: bool) -> EmbeddedBroker:
    """1883 when free (once a broker a killed serve left there is stopped), so `edgellm ask` finds
    it without --broker; else any free port. `asked`: --broker embedded rather than no --broker."""
    broker = start_embedded(kind, port=1883)
    why = f"--broker {EMBEDDED}" if asked else "no --broker given"
    if kind == MOSQUITTO:
        log.warning("%s: started an embedded mosquitto at %s (this host only)", why, broker.url)
    else:
        log.warning("%s: started the in-process Python broker (amqtt) at %s (this host only); "
                    "MQTT 5 is unavailable on it, so the service speaks 3.1.1", why, broker.url)
    return broker


def _recipe_config(args: argparse.Namespace, topics: proto.Topics, config: ServiceConfig) -> AnomalyConfig | None:
    if args.recipe is None:
        return None
    recipe = load_config(args.config)
    recipe.check_service(topics, config.max_tokens)
    return recipe


def _http_config(args: argparse.Namespace) -> Any:
    """The HTTP front's settings, or None without --http; the key file is read here, before the slow load."""
    given = [f"--{name.replace('_', '-')}" for name in ("api_key_file", "http_max_body", "http_allow_origin",
                                                          "http_server_name", "http_max_connections",
                                                          "http_read_timeout") if getattr(args, name) is not None]
    if args.http is None:
        if given:
            raise ValueError(f"{', '.join(given)}: only with --http HOST:PORT")
        return None
    try:
        from ..service.http import HttpConfig
    except ImportError as exc:
        raise ValueError(f"--http needs the http extra ({exc.name} is missing): pip install 'edgellm[http]'") from None
    host, port = parse_address(args.http)
    keys = _api_keys(args.api_key_file) if args.api_key_file else ()
    settings: dict[str, Any] = {"allow_origins": _listed(args.http_allow_origin, strip="/"),
                                "server_names": _listed(args.http_server_name, strip=".")}
    for name, field, low in (("http_max_body", "max_body", 1), ("http_max_connections", "max_connections", 1),
                             ("http_read_timeout", "read_timeout", 0.1)):
        value = getattr(args, name)
        if value is not None and not value >= low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if value is not None:
            settings[field] = value
    return HttpConfig(host, port, keys, **settings)


def _wyoming_config(args: argparse.Namespace) -> Any:
    """The Wyoming front's settings, or None without --wyoming; checked before the slow load."""
    if args.wyoming is None:
        return None
    try:
        from ..service.wyoming import WyomingConfig
    except ImportError as exc:
        raise ValueError(f"--wyoming needs the wyoming extra ({exc.name} is missing): "
                         "pip install 'edgellm[wyoming]'") from None
    host, port = parse_address(args.wyoming, "--wyoming")
    config = WyomingConfig(host, port)
    return dataclasses.replace(config, system=args.shared_system) if args.shared_system else config


def _api_keys(path: str) -> tuple[str, ...]:
    """The keys of an --api-key-file: one per line; blank lines and # comments are not keys."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot read keys ({exc})") from None
    keys = tuple(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.strip().startswith("#")))
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it (one per line; # starts a comment)")
    return keys


def _listed(values: list[str] | None, strip: str) -> tuple[str, ...]:
    """A repeatable option's values, each possibly a comma-separated list, as one tuple."""
    return tuple(v.strip().rstrip(strip) for value in values or () for v in value.split(",") if v.strip())


def _share_prompts(model: Any, system: str | None, recipe: AnomalyConfig | None) -> None:
    """Declare the prompts every client may reuse: --shared-system and the recipe's."""
    prompts = [[{"role": "system", "content": system}]] if system else []
    if recipe is not None and shared_prompt(recipe) not in prompts:
        prompts.append(shared_prompt(recipe))
    for prompt in prompts:
        tokens = model.share_prefix(prompt)
        log.info("shared between clients: the %d tokens that start a chat with system prompt %.40r", tokens,
                 prompt[0]["content"])


def _embedder(args: argparse.Namespace) -> Any:
    """The --embedding bundle, loaded beside the generative one, or None."""
    if args.embedding is None:
        return None
    import edgellm
    from ..retrieval.embed import EmbeddingModel, Embedder

    model = edgellm.load(args.embedding, profile=args.profile, providers=args.providers, threads=args.threads,
                         verify=not args.no_verify)
    if not isinstance(model, EmbeddingModel):
        raise ValueError(f"--embedding {args.embedding}: a {model.manifest.graph.kind} bundle, not an embedding "
                         f"one (export a sentence encoder, e.g. edgellm export all-minilm-l6-v2)")
    log.info("embedding with %s (%d dimensions)", model.name, model.dimensions)
    return Embedder(model)


def _retriever(specs: list[str] | None, embedder: Any) -> Any:
    """The --index NAME=FILE indexes, read with the --embedding model, or None."""
    if not specs:
        return None
    if embedder is None:
        raise ValueError("--index needs --embedding BUNDLE: the model that embeds each request's question "
                         "(the one the index was built with)")
    from ..retrieval.retriever import Retriever

    indexes: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and path) or name in indexes:
            raise ValueError(f"--index {spec!r}: write NAME=FILE, each NAME once")
        indexes[name] = Path(path)
    retriever = Retriever(indexes, embedder)
    log.info("answering from %s", ", ".join(f"{name} ({path})" for name, path in indexes.items()))
    return retriever


def _ha_discovery(prefix: str, conn: Connection, topics: proto.Topics, engine: Any, service: Service,
                  recipe: AnomalyConfig | None) -> Any:
    """The Home Assistant announcer of `service` (and of the recipe's machines, whose explanations
    it reads on the recipe's output topics)."""
    from ..integrations.ha_discovery import HaDiscovery

    return HaDiscovery(conn, topics, engine, service.model.manifest.name or topics.device,
                       status_topic=service.status_topic, prefix=prefix,
                       explanations=_explanations(recipe) if recipe is not None else None,
                       client_id=f"{service.client_id}-ha")


def _explanations(recipe: AnomalyConfig) -> str:
    """The filter of the recipe's output topics, which the integrations read."""
    explanations = recipe.output.format(machine="+", sensor="+")
    if not valid_filter(explanations):
        raise ValueError(f"anomaly.output {recipe.output!r} must have {{machine}} and {{sensor}} as whole topic "
                         "levels for Home Assistant and Sparkplug to read the explanations")
    return explanations


def run_serve(args: argparse.Namespace) -> int:
    _apply_config(args)
    topics = _topics(args)
    config = _service_config(args, topics)
    http_config = _http_config(args)
    wyoming_config = _wyoming_config(args)
    mqtt = args.broker is not None or (http_config is None and wyoming_config is None)
    if args.recipe and not mqtt:
        raise ValueError(f"--recipe {args.recipe} is a client of the MQTT service: pass --broker (or "
                         f"--broker {EMBEDDED}) next to --http")
    if args.ha_discovery is not None and not mqtt:
        raise ValueError(f"--ha-discovery announces the MQTT service: pass --broker (or --broker {EMBEDDED}) "
                         "next to --http")
    recipe_config = _recipe_config(args, topics, config)  # a bad recipe setting fails before the slow load too
    sparkplug_config = load_sparkplug(args.config) if recipe_config is not None else None
    if sparkplug_config is not None:
        from ..integrations.sparkplug import require

        require()
    embedded = mqtt and args.broker in (None, EMBEDDED)
    # bad settings fail before the slow load
    conn = _connection(args, "mqtt://127.0.0.1" if embedded else args.broker) if mqtt else None
    kind = None
    if embedded:
        kind = embedded_kind()
        conn = dataclasses.replace(conn, mqtt_version=_embedded_version(kind, args))
    model = load_model(args)
    embedder = _embedder(args)
    model.retriever = _retriever(args.index, embedder)
    _share_prompts(model, wyoming_config.system if wyoming_config else args.shared_system, recipe_config)
    engine = engine_for(model, config).start()  # one queue for MQTT and HTTP alike
    broker = service = http = recipe = discovery = sparkplug = wyoming = None
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if kind is not None:
            broker = _embedded_broker(kind, asked=args.broker == EMBEDDED)
            conn = dataclasses.replace(conn, broker=BrokerAddress.parse(broker.url))
        if http_config is not None:
            from ..service.http_server import HttpServer

            http = HttpServer(engine, http_config, embedder=embedder).start()
            log.info("serving %s over HTTP at %s (OpenAI: %s/v1, Ollama: %s)%s", model.manifest.name or args.bundle,
                     http.url, http.url, http.url, f"; {len(http_config.api_keys)} bearer key(s) accepted" if http_config.api_keys else "")
        if wyoming_config is not None:
            from ..service.wyoming import WyomingServer

            wyoming = WyomingServer(engine, model.manifest.name or str(args.bundle), wyoming_config).start()
        if mqtt:
            service = Service(model, conn, config, engine, embedder=embedder).start()
            if recipe_config is not None:
                recipe = AnomalyRecipe(conn, topics, recipe_config, client_id=f"{service.client_id}-anomaly").start()
            if sparkplug_config is not None:
                from ..integrations.sparkplug import SparkplugNode

                sparkplug = SparkplugNode(conn, sparkplug_config, topics.device, _explanations(recipe_config),
                                          model.manifest.name or topics.device).start()
            log.info("serving %s as device %r: requests on %s", model.manifest.name or args.bundle,
                     topics.device, topics.request)
            if args.ha_discovery is not None:
                discovery = _ha_discovery(args.ha_discovery, conn, topics, engine, service, recipe_config).start()
        while not stop.is_set() and not (service is not None and service.finished.is_set()):
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for integration in (discovery, sparkplug):
            if integration is not None:
                integration.stop()
        if recipe is not None:
            recipe.stop()
        engine.close()  # cancels every request: MQTT finals go out before the service says offline
        if http is not None:
            http.stop()
        if wyoming is not None:
            wyoming.stop()
        if service is not None:
            service.stop()
        if broker is not None:
            broker.close()
    return 1 if service is not None and service.failure else 0


def _print_replies(command: str, replies: Iterable[dict[str, Any]], as_json: bool = False) -> int:
    """The answer to stdout as it arrives, one stats line to stderr; an error reply is one line and exit 1."""
    printer = AnswerPrinter()
    try:
        for reply in replies:
            if as_json:
                print(proto.encode(reply).decode())
                continue
            if reply.get("restart"):
                printer.restart()
            if reply.get("done"):
                printer.finish(reply.get("tool_calls", []))
                print(_stats(reply), file=sys.stderr)
            else:
                printer.reasoning(reply.get("reasoning", ""))
                printer.text(reply.get("delta", ""))
    except RequestError as exc:
        print(f"edgellm {command}: error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 0


def _stats(final: dict[str, Any]) -> str:
    u = final.get("usage") or {}
    return (f"[{final.get('finish_reason')}] prompt {u.get('prompt_tokens', '?')} tok, "
            f"completion {u.get('completion_tokens', '?')} tok, ttft {u.get('ttft_s', 0) * 1000:.0f} ms, "
            f"{u.get('decode_tokens_per_s', 0):.1f} tok/s")


def _chat_request(prompt: str, system: str | None = None) -> dict[str, Any]:
    system_turn = [{"role": "system", "content": system}] if system else []
    return {"id": new_request_id(), "stream": True,
            "messages": [*system_turn, {"role": "user", "content": prompt}]}


def run_ask(args: argparse.Namespace) -> int:
    if args.raw:
        request: dict[str, Any] = {"id": new_request_id(), "stream": True, "prompt": args.prompt}
    else:
        request = _chat_request(args.prompt, args.system)
    request.update(to_wire(sampling_params(args)))
    conn = _connection(args, args.broker or "mqtt://127.0.0.1:1883")
    # Without an explicit --mqtt-version, a 3.1.1-only broker (the Python fallback) still works.
    replies = ask(conn, _topics(args), request, args.timeout, downgrade=args.mqtt_version is None)
    return _print_replies("ask", replies, args.json)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"default: {DEFAULT_PROMPT!r}")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, metavar="DIR",
                   help=f"bundle to serve; SmolLM2 is exported here when it is missing (default: {DEFAULT_BUNDLE})")
    p.add_argument("--work", type=Path, metavar="DIR",
                   help="keep the embedded mosquitto's config, data and log here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply (default: 120)")
    p.add_argument("--system", default=DEMO_SYSTEM, help=f"system prompt (default: {DEMO_SYSTEM!r})")


def run_demo(args: argparse.Namespace) -> int:
    model = load(ensure_bundle(args.bundle))
    request = _chat_request(args.prompt, args.system)
    with local_service(model, args.work) as (conn, topics):
        log.info("publishing request %s on %s, as a device would; the answer streams back over MQTT",
                 request["id"], topics.request)
        # The service's own line for the finished request would land in the middle of
        # the streamed answer's last line: the stats line below says the same.
        level = log.level
        log.setLevel(logging.WARNING)
        try:
            return _print_replies("demo", ask(conn, topics, request, args.timeout))
        finally:
            log.setLevel(level)
