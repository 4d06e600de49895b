"""The MQTT service: devices publish requests, `edgellm serve` streams answers back.

`protocol` is the wire format (pure), `connection` how to reach a broker, `server`
the service, `broker` the embedded mosquitto (`amqtt_broker` the in-process fallback),
`client` what `edgellm ask` uses, `demo` the one-command tour, `commands` the CLI entry points.
See docs/mqtt.md for topics and payloads.
"""
