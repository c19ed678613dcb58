"""Tests for gitlawb.git.pktline."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gitlawb.git.pktline import (
    DELIM,
    FLUSH,
    MAX_PAYLOAD_LENGTH,
    RESPONSE_END,
    Packet,
    PktLineError,
    PktLineReader,
    Special,
    encode,
    service_advertisement_header,
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Cut bytes at the given offsets (taken modulo the length, sorted).
    """
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def serialise(packets: list[Packet]) -> bytes:
    """
    Encode packets back into a stream.
    """
    specials = {Special.FLUSH: FLUSH, Special.DELIM: DELIM}
    specials[Special.RESPONSE_END] = RESPONSE_END
    return b"".join(
        specials[p] if isinstance(p, Special) else encode(p) for p in packets
    )


packets_strategy = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from([Special.FLUSH, Special.DELIM, Special.RESPONSE_END]),
    ),
    max_size=20,
)


def test_encode_prefixes_length() -> None:
    """A payload is prefixed with its length plus four, in lower-case hex."""
    assert encode(b"# service=git-upload-pack\n") == (
        b"001e# service=git-upload-pack\n"
    )


def test_encode_text_as_utf8() -> None:
    """Text payloads are encoded as UTF-8 before framing."""
    assert encode("é\n") == b"0007\xc3\xa9\n"


def test_encode_refuses_oversized_payload() -> None:
    """A payload longer than 65516 bytes does not fit one packet."""
    with pytest.raises(PktLineError):
        encode(b"x" * (MAX_PAYLOAD_LENGTH + 1))


def test_encode_accepts_largest_payload() -> None:
    """A 65516-byte payload makes a 65520-byte packet."""
    assert encode(b"x" * MAX_PAYLOAD_LENGTH)[:4] == b"fff0"


def test_service_advertisement_header() -> None:
    """The info/refs preamble is the service pkt-line and a flush."""
    assert service_advertisement_header("git-receive-pack") == (
        b"001f# service=git-receive-pack\n0000"
    )


def test_service_advertisement_header_refuses_unknown_service() -> None:
    """Only upload-pack and receive-pack are advertised."""
    with pytest.raises(ValueError):
        service_advertisement_header("git-upload-archive")


def test_reader_yields_data_and_special_packets() -> None:
    """Data, flush, delim and response-end packets come out in order."""
    reader = PktLineReader()

    packets = reader.feed(b"0009hello0000000100020004")

    assert packets == [
        b"hello",
        Special.FLUSH,
        Special.DELIM,
        Special.RESPONSE_END,
        b"",
    ]


def test_reader_keeps_partial_packet() -> None:
    """An incomplete packet stays buffered until the rest arrives."""
    reader = PktLineReader()

    first = reader.feed(b"0009hel")
    second = reader.feed(b"lo")

    assert (first, second) == ([], [b"hello"])


def test_reader_accepts_upper_case_hex() -> None:
    """Length digits are hex in either case."""
    assert PktLineReader().feed(b"000Ahello!") == [b"hello!"]


@pytest.mark.parametrize("header", [b"0003", b"fff1", b"zzzz", b"00 9", b"-009"])
def test_reader_refuses_invalid_length(header: bytes) -> None:
    """Length 3, lengths above 65520 and non-hex headers are errors."""
    with pytest.raises(PktLineError):
        PktLineReader().feed(header + b"xxxxxxxx")


def test_reader_stays_failed() -> None:
    """After a framing error every later feed fails too."""
    reader = PktLineReader()
    with pytest.raises(PktLineError):
        reader.feed(b"0003")

    with pytest.raises(PktLineError):
        reader.feed(b"0000")


def test_iter_feed_leaves_rest_buffered() -> None:
    """Stopping at a packet leaves everything after it in the buffer."""
    reader = PktLineReader()

    for packet in reader.iter_feed(b"0008abcd0000PACKrest"):
        if packet is Special.FLUSH:
            break

    assert reader.buffered == b"PACKrest"


@given(packets=packets_strategy, cuts=st.lists(st.integers(min_value=0)))
def test_reader_is_independent_of_chunking(
    packets: list[Packet], cuts: list[int]
) -> None:
    """Any split of a stream yields the same packets as the whole stream."""
    stream = serialise(packets)
    reader = PktLineReader()

    result: list[Packet] = []
    for piece in split_at(stream, cuts):
        result.extend(reader.feed(piece))

    assert result == packets
    assert reader.buffered == b""


@given(packets=packets_strategy)
def test_reader_byte_by_byte(packets: list[Packet]) -> None:
    """Feeding one byte at a time yields the same packets."""
    stream = serialise(packets)
    reader = PktLineReader()

    result: list[Packet] = []
    for i in range(len(stream)):
        result.extend(reader.feed(stream[i : i + 1]))

    assert result == packets
