"""The MQTT service: devices publish requests, `edgellm serve` streams answers back.

`protocol` is the wire format (pure), `connection` how to reach a broker, `server`
the service, `broker` the embedded mosquitto, `client` what `edgellm ask` uses,
`commands` the CLI entry points.
See docs/mqtt.md for topics and payloads.
"""
