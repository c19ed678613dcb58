"""Git's pkt-line framing: encoding, and an incremental reader.

A pkt-line is four lower-case hex digits giving the length of the whole
packet (the four digits included) followed by the payload. Lengths 0000,
0001 and 0002 are the special packets flush, delim and response-end (the
last two exist in protocol v2 only); 0003 is never valid. The longest packet
git sends or accepts is 65520 bytes, so a payload is at most 65516 bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

__all__ = [
    "DELIM",
    "FLUSH",
    "MAX_PACKET_LENGTH",
    "MAX_PAYLOAD_LENGTH",
    "RESPONSE_END",
    "Packet",
    "PktLineError",
    "PktLineReader",
    "Special",
    "encode",
    "service_advertisement_header",
]

MAX_PACKET_LENGTH = 65520
MAX_PAYLOAD_LENGTH = MAX_PACKET_LENGTH - 4

FLUSH = b"0000"
DELIM = b"0001"
RESPONSE_END = b"0002"

# The only services a smart HTTP server advertises.
_SERVICES = frozenset({"git-upload-pack", "git-receive-pack"})


class PktLineError(ValueError):
    """
    The bytes are not a valid pkt-line stream.
    """


class Special(enum.Enum):
    """
    The packets that carry no payload.
    """

    FLUSH = 0
    DELIM = 1
    RESPONSE_END = 2


# A data packet is its payload; a special packet is a member of Special.
Packet = bytes | Special


def encode(payload: bytes | str) -> bytes:
    """
    Frame one payload as a pkt-line; text is encoded as UTF-8.

    @raise PktLineError: when the payload does not fit in one packet.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise PktLineError(f"payload of {len(payload)} bytes exceeds one pkt-line")
    return b"%04x" % (len(payload) + 4,) + payload


def service_advertisement_header(service: str) -> bytes:
    """
    The preamble of a smart HTTP C{info/refs} answer: the pkt-line
    C{# service=<service>\\n} followed by a flush.

    @param service: C{git-upload-pack} or C{git-receive-pack}.
    @raise ValueError: for any other service.
    """
    if service not in _SERVICES:
        raise ValueError(f"not a git smart HTTP service: {service!r}")
    return encode(f"# service={service}\n") + FLUSH


class PktLineReader:
    """
    Splits a byte stream into packets, however the stream is chunked.

    Feed it bytes as they arrive; each call returns the packets completed so
    far. At most one packet (65520 bytes) is ever buffered. After a framing
    error the reader stays failed: every further C{feed} raises again.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: PktLineError | None = None

    @property
    def buffered(self) -> bytes:
        """
        Bytes received but not yet part of a complete packet.

        A caller that stops reading pkt-lines mid-stream (a push request's
        pack follows its commands) takes the rest of the stream from here.
        """
        return bytes(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:
        """
        Add bytes to the stream.

        @return: the packets completed by these bytes, in order.
        @raise PktLineError: when the stream holds an invalid length.
        """
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[Packet]:
        """
        Like L{feed}, but yields the packets one at a time, so that a caller
        can stop at a packet (say, the flush ending a command list) and find
        everything after it still in L{buffered}.
        """
        if self._error is not None:
            raise self._error
        # Append now, not on the first next(): a generator body runs lazily.
        self._buffer += data
        return self._drain()

    def _drain(self) -> Iterator[Packet]:
        """
        Yield complete packets from the buffer, removing each before it is
        yielded.
        """
        while len(self._buffer) >= 4:
            length = self._length(bytes(self._buffer[:4]))
            if length < 4:
                del self._buffer[:4]
                yield Special(length)
                continue
            if len(self._buffer) < length:
                return
            payload = bytes(self._buffer[4:length])
            del self._buffer[:length]
            yield payload

    def _length(self, header: bytes) -> int:
        """
        Decode and check a four-digit length header.
        """
        try:
            if not all(c in b"0123456789abcdefABCDEF" for c in header):
                raise ValueError(header)
            length = int(header, 16)
        except ValueError:
            self._error = PktLineError(f"invalid pkt-line length {header!r}")
            raise self._error from None
        if length == 3 or length > MAX_PACKET_LENGTH:
            self._error = PktLineError(f"invalid pkt-line length {header!r}")
            raise self._error
        return length
