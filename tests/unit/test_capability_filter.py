"""
The advertisement filter that keeps git-remote-gitlawb 0.7.1 from hanging.
"""

from __future__ import annotations

from typing import Any

from gitlawb.git.pktline import PktLineReader, encode
from gitlawb.git.smart_http import CapabilityFilter

HEAD = "a" * 40


class ListConsumer:
    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


def advertisement() -> bytes:
    caps = "multi_ack shallow deepen-since side-band-64k agent=git/2.39"
    first = f"{HEAD} refs/heads/main\0{caps}\n"
    return encode(first) + encode(f"{HEAD} refs/tags/v1\n") + b"0000"


def test_hidden_capabilities_removed_from_first_line() -> None:
    """The hidden capabilities vanish; the others and the other lines stay."""
    consumer = ListConsumer()
    flt = CapabilityFilter(consumer, (b"shallow", b"deepen-since"))

    flt.write(advertisement())

    packets = PktLineReader().feed(consumer.data)
    assert packets[0] == (
        f"{HEAD} refs/heads/main\0multi_ack side-band-64k agent=git/2.39\n".encode()
    )
    assert packets[1] == f"{HEAD} refs/tags/v1\n".encode()


def test_split_writes_are_reassembled() -> None:
    """The first pkt-line may arrive one byte at a time."""
    consumer = ListConsumer()
    flt = CapabilityFilter(consumer, (b"shallow",))

    for i, byte in enumerate(advertisement()):
        flt.write(bytes([byte]))
        if i < 4:
            assert consumer.data == b""

    assert b"shallow" not in consumer.data
    assert b"deepen-since" in consumer.data


def test_empty_repository_flush_passes() -> None:
    """An advertisement that is only a flush passes unchanged."""
    consumer = ListConsumer()
    flt = CapabilityFilter(consumer, (b"delete-refs",))

    flt.write(b"0000")

    assert consumer.data == b"0000"


def test_upload_request_must_start_with_a_pkt_line() -> None:
    """A body that is not pkt-lines is refused before git runs."""
    import io

    import pytest

    from gitlawb.api.errors import ApiError
    from gitlawb.git.smart_http import _check_pkt_line_start

    with pytest.raises(ApiError) as raised:
        _check_pkt_line_start(io.BytesIO(b"garbage-not-pktline"))
    _check_pkt_line_start(io.BytesIO(b"0000"))

    assert raised.value.status == 400
