"""A paho client whose memory per incoming message is bounded before the message is parsed.

paho reads a whole PUBLISH into memory before `on_message` sees it, and asks the socket for
all of it at once (`recv(remaining_length)` allocates that many bytes up front): one 200 MB
message took the service from 234 to 1016 MB. MQTT 5's Maximum Packet Size is no answer: the
broker drops a larger message without telling its sender, who then waits for a reply that
never comes (and MQTT 3.1.1 has no such property). So reads are capped at 64 KiB, and a PUBLISH
longer than the limit is read into a buffer that keeps only its first `limit` bytes: the
connection stays in step (the message can be acknowledged, not redelivered forever) and the
service answers `too_large`.
"""
from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

_READ = 64 * 1024
_PUBLISH = 0x30


class _Capped(bytearray):
    """Keeps the first `limit` bytes appended to it and counts the rest."""

    def __init__(self, limit: int, total: int) -> None:
        super().__init__()
        self.limit = limit
        self.total = total

    def __iadd__(self, data: Any) -> "_Capped":
        room = self.limit - len(self)
        if room > 0:
            super().__iadd__(data[:room])
        return self


class BoundedClient(mqtt.Client):
    """`mqtt.Client` that never buffers more than `max_packet` bytes of one incoming message.

    Relies on paho 2.x's reader (`_sock_recv`, `_in_packet`); tests/test_bounded.py checks it
    against a real broker, so a paho change that breaks it fails there, not in the field.
    """

    def __init__(self, *args: Any, max_packet: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet = max_packet

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if (
            self.max_packet is not None
            and packet["have_remaining"]
            and packet["command"] & 0xF0 == _PUBLISH
            and packet["remaining_length"] > self.max_packet
            and not isinstance(packet["packet"], _Capped)
        ):
            packet["packet"] = _Capped(self.max_packet, packet["remaining_length"])
        return super()._sock_recv(min(bufsize, _READ))

    def oversized(self, msg: mqtt.MQTTMessage) -> int | None:
        """In `on_message`: the real payload length of `msg` if it was cut, else None."""
        buffer = self._in_packet["packet"]
        if not isinstance(buffer, _Capped):
            return None
        return buffer.total - (len(buffer) - len(msg.payload))  # what follows the topic and properties
