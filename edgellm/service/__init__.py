"""The fronts over the engine: each parses its wire format into the one checked request and
serializes what comes back.

MQTT: `protocol` is the wire format (pure), `connection` how to reach a broker, `server` the
service (with `acks` and `admission`), `broker` the embedded mosquitto (`amqtt_broker` the
in-process fallback), `client` what `edgellm ask` uses; see docs/mqtt.md. HTTP: `http` what
the OpenAI, Ollama and embedding routes (`http_openai`, `http_ollama`, `http_embed`) share,
`http_server` the app that assembles them behind `http_guard`; see docs/http.md. The command
line that starts them lives in `edgellm.cli`.
"""
