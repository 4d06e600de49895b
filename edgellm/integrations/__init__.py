"""Integrations with the systems edgellm's users run: Home Assistant discovery, Sparkplug B.

Each is a client of the broker beside the service (its own connection), so the service's
request path never waits on them and none of them holds generation logic."""
