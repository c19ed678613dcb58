"""What a push asks for, and what git says it did.

A smart HTTP push body (protocol v0/v1; pushes have no v2) starts with
pkt-lines before the pack:

    shallow <oid>                       zero or more, when the client is shallow
    <old> <new> <ref>\\0<capabilities>   the first command carries the caps
    <old> <new> <ref>                   further commands
    0000                                flush
    [push options, then 0000]           only with the push-options capability
    PACK...

A signed push (push-cert) replaces the command pkt-lines with a certificate
(C{push-cert\\0<caps>}, the certificate's lines with the commands among
them, C{push-cert-end}) followed by the flush. This node never advertises
push-cert, but a certificate is read rather than refused.

C{git receive-pack --stateless-rpc} answers with report-status (or
report-status-v2) when the client asked for it:

    unpack ok | unpack <error>
    ok <ref> | ng <ref> <reason>        one per command
    [option <key> [<value>]]            report-status-v2 only, after an ok
    0000

With the side-band-64k capability the report travels inside band 1 of a
multiplexed stream (band 2 carries progress text, band 3 a fatal error) and
the whole stream ends with an outer flush. Band 1 payloads are slices of
the inner pkt-line stream, not whole inner packets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, NamedTuple

from gitlawb.git.pktline import Packet, PktLineError, PktLineReader, Special

__all__ = [
    "PushCommandParser",
    "PushCommands",
    "PushProtocolError",
    "RefCommand",
    "RefResult",
    "ReportStatusParser",
    "UnpackResult",
    "read_push_commands",
]

_OID = re.compile(rb"\A(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")

# Bounded so a chatty hook cannot grow memory without limit.
_MAX_MESSAGES_BYTES = 64 * 1024


class PushProtocolError(ValueError):
    """
    The push request is not the pkt-line command list git sends.
    """


class RefCommand(NamedTuple):
    """
    One ref update a client asks for; C{old} and C{new} are hex object ids.
    """

    old: str
    new: str
    ref: str

    @property
    def is_create(self) -> bool:
        """
        Whether the ref did not exist before (old is all zeros).
        """
        return _is_zero(self.old)

    @property
    def is_delete(self) -> bool:
        """
        Whether the command deletes the ref (new is all zeros).
        """
        return _is_zero(self.new)


@dataclass(frozen=True)
class PushCommands:
    """
    The command section of a push request.

    @ivar commands: the ref updates, in request order.
    @ivar capabilities: the capabilities from the first command, as sent
        (C{agent=git/2.39.5} keeps its value).
    @ivar shallow: object ids of the client's shallow boundary.
    @ivar push_cert: whether the commands came inside a push certificate.
    """

    commands: tuple[RefCommand, ...]
    capabilities: frozenset[str]
    shallow: tuple[str, ...] = ()
    push_cert: bool = False

    @property
    def sideband(self) -> bool:
        """
        Whether git will multiplex its answer (side-band-64k).
        """
        return "side-band-64k" in self.capabilities

    @property
    def wants_report(self) -> bool:
        """
        Whether git will answer with report-status (either version).
        """
        return bool({"report-status", "report-status-v2"} & self.capabilities)


class PushCommandParser:
    """
    Reads the command section from the start of a push body, incrementally.

    Feed it the body's first bytes; once it has seen the flush that ends the
    commands, L{feed} returns the L{PushCommands} and the parser takes no
    more input. Push options, if any, and the pack come after and are left
    to git.
    """

    def __init__(self, max_commands: int = 10_000) -> None:
        self._reader = PktLineReader()
        self._max_commands = max_commands
        self._commands: list[RefCommand] = []
        self._capabilities: frozenset[str] | None = None
        self._shallow: list[str] = []
        self._in_cert = False
        self._push_cert = False
        self._cert_part = "headers"
        self._result: PushCommands | None = None

    @property
    def result(self) -> PushCommands | None:
        """
        The commands once complete, else C{None}.
        """
        return self._result

    @property
    def remainder(self) -> bytes:
        """
        The bytes fed after the terminating flush (push options or the
        pack's start), or the incomplete packet still awaiting its end.
        """
        return self._reader.buffered

    def feed(self, data: bytes) -> PushCommands | None:
        """
        Add body bytes.

        @return: the commands once the terminating flush has been read
            (and on every later call), else C{None}.
        @raise PushProtocolError: when the bytes are not a command list.
        """
        if self._result is not None:
            return self._result
        try:
            for packet in self._reader.iter_feed(data):
                if self._packet(packet):
                    self._result = PushCommands(
                        commands=tuple(self._commands),
                        capabilities=self._capabilities or frozenset(),
                        shallow=tuple(self._shallow),
                        push_cert=self._push_cert,
                    )
                    return self._result
        except PktLineError as e:
            raise PushProtocolError(str(e)) from e
        return None

    def _packet(self, packet: Packet) -> bool:
        """
        Take one packet; return whether it ended the command section.
        """
        if packet is Special.FLUSH:
            if self._in_cert:
                raise PushProtocolError("flush inside a push certificate")
            return True
        if isinstance(packet, Special):
            raise PushProtocolError(f"unexpected {packet.name} packet in commands")

        line = packet.removesuffix(b"\n")
        if self._in_cert:
            self._cert_line(line)
            return False
        if not self._commands and self._capabilities is None:
            if line.startswith(b"shallow "):
                self._shallow.append(_oid(line[8:]))
                return False
            if line.startswith(b"push-cert\0"):
                self._capabilities = _capabilities(line[10:])
                self._in_cert = self._push_cert = True
                return False
            line, nul, caps = line.partition(b"\0")
            self._capabilities = _capabilities(caps) if nul else frozenset()
        self._add_command(line)
        return False

    def _cert_line(self, line: bytes) -> None:
        """
        Take one line of a push certificate: headers, a blank line, the
        commands, then the signature up to C{push-cert-end}.
        """
        if line == b"push-cert-end":
            self._in_cert = False
        elif self._cert_part == "headers":
            if line == b"":
                self._cert_part = "commands"
        elif self._cert_part == "commands":
            if line.startswith(b"-----BEGIN"):
                self._cert_part = "signature"
            else:
                self._add_command(line)

    def _add_command(self, line: bytes) -> None:
        """
        Parse C{<old> <new> <ref>} and record it.
        """
        parts = line.split(b" ", 2)
        if len(parts) != 3:
            raise PushProtocolError(f"malformed push command {line[:200]!r}")
        old, new = _oid(parts[0]), _oid(parts[1])
        if len(old) != len(new):
            raise PushProtocolError("push command mixes object id lengths")
        try:
            ref = parts[2].decode("utf-8")
        except UnicodeDecodeError:
            raise PushProtocolError("push command ref is not UTF-8") from None
        if not ref or any(c in ref for c in "\0\n "):
            raise PushProtocolError(f"malformed ref in push command {ref!r}")
        if len(self._commands) >= self._max_commands:
            raise PushProtocolError("too many push commands")
        self._commands.append(RefCommand(old, new, ref))


def read_push_commands(
    stream: IO[bytes], chunk_size: int = 8192, max_bytes: int = 16 * 1024 * 1024
) -> PushCommands:
    """
    Read the command section from a push body file.

    Reads from the file's current position; the position afterwards is
    unspecified, so seek before handing the file to git.

    @param max_bytes: give up when the commands run longer than this.
    @raise PushProtocolError: when the body is malformed, truncated or too
        long before its flush.
    """
    parser = PushCommandParser()
    consumed = 0
    while consumed < max_bytes:
        chunk = stream.read(min(chunk_size, max_bytes - consumed))
        if not chunk:
            raise PushProtocolError("push body ends before its command flush")
        consumed += len(chunk)
        result = parser.feed(chunk)
        if result is not None:
            return result
    raise PushProtocolError("push command section too long")


@dataclass(frozen=True)
class UnpackResult:
    """
    The C{unpack} line: C{error} is C{None} when git unpacked the pack.
    """

    error: str | None

    @property
    def ok(self) -> bool:
        """
        Whether the pack was received and unpacked.
        """
        return self.error is None


@dataclass(frozen=True)
class RefResult:
    """
    One C{ok <ref>} or C{ng <ref> <reason>} line (reason C{None} for ok).
    """

    ref: str
    reason: str | None

    @property
    def ok(self) -> bool:
        """
        Whether git updated this ref.
        """
        return self.reason is None


ReportEvent = UnpackResult | RefResult


class ReportStatusParser:
    """
    Follows C{git receive-pack --stateless-rpc} stdout as it streams and
    extracts the report.

    Feed it every stdout chunk (it never raises: a malformed stream sets
    L{protocol_error} and the parser ignores the rest, so a tap on the
    response cannot break the response). L{updated_refs} is what git
    reported as updated: refs with C{ok}, and only when the pack unpacked.

    @param sideband: whether the client asked for side-band-64k (see
        L{PushCommands.sideband}); the report is multiplexed then.
    """

    def __init__(self, sideband: bool) -> None:
        self._sideband = sideband
        self._outer = PktLineReader()
        self._inner = PktLineReader()
        self.unpack: UnpackResult | None = None
        self.refs: dict[str, RefResult] = {}
        self.complete = False
        self.protocol_error: str | None = None
        self.fatal_error: str | None = None
        self._messages = bytearray()

    @property
    def updated_refs(self) -> frozenset[str]:
        """
        The refs git reports as updated.
        """
        if self.unpack is None or not self.unpack.ok:
            return frozenset()
        return frozenset(ref for ref, r in self.refs.items() if r.ok)

    @property
    def messages(self) -> str:
        """
        Progress and error text from bands 2 and 3 (first 64 KiB).
        """
        return self._messages.decode("utf-8", "replace")

    def feed(self, data: bytes) -> list[ReportEvent]:
        """
        Add stdout bytes.

        @return: the report lines these bytes completed, as events.
        """
        if self.protocol_error is not None:
            return []
        try:
            if not self._sideband:
                return self._report(self._outer.feed(data))
            events: list[ReportEvent] = []
            for packet in self._outer.feed(data):
                events.extend(self._band(packet))
            return events
        except ValueError as e:  # PktLineError and UnicodeDecodeError too
            self.protocol_error = str(e)
            return []

    def _band(self, packet: Packet) -> list[ReportEvent]:
        """
        Demultiplex one outer packet.
        """
        if isinstance(packet, Special):
            # The outer flush ends the stream; nothing else is expected.
            if packet is not Special.FLUSH:
                raise ValueError(f"unexpected {packet.name} in side-band stream")
            return []
        if not packet:
            raise ValueError("empty side-band packet")
        band, payload = packet[0], packet[1:]
        if band == 1:
            return self._report(self._inner.feed(payload))
        if band in (2, 3):
            room = _MAX_MESSAGES_BYTES - len(self._messages)
            self._messages += payload[: max(room, 0)]
            if band == 3:
                self.fatal_error = payload.decode("utf-8", "replace").strip()
            return []
        raise ValueError(f"unknown side-band {band}")

    def _report(self, packets: Iterable[Packet]) -> list[ReportEvent]:
        """
        Interpret report-status pkt-lines.
        """
        events: list[ReportEvent] = []
        for packet in packets:
            if self.complete:
                raise ValueError("data after the end of the report")
            if packet is Special.FLUSH:
                self.complete = True
                continue
            if isinstance(packet, Special):
                raise ValueError(f"unexpected {packet.name} in report-status")
            event = self._line(packet.removesuffix(b"\n").decode("utf-8"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ReportEvent | None:
        """
        Interpret one report line.
        """
        if self.unpack is None:
            if not line.startswith("unpack "):
                raise ValueError(f"report does not start with unpack: {line!r}")
            status = line[7:]
            self.unpack = UnpackResult(None if status == "ok" else status)
            return self.unpack
        if line.startswith("ok "):
            result = RefResult(line[3:], None)
        elif line.startswith("ng "):
            ref, _, reason = line[3:].partition(" ")
            result = RefResult(ref, reason or "failed")
        elif line.startswith("option ") and self.refs:
            # report-status-v2 detail about the previous ref (set only by a
            # proc-receive hook, which this node does not install).
            return None
        else:
            raise ValueError(f"unexpected report-status line {line!r}")
        if not result.ref:
            raise ValueError("report line without a ref")
        self.refs[result.ref] = result
        return result


def _capabilities(raw: bytes) -> frozenset[str]:
    """
    Split a capability list (space separated, maybe with a leading space).
    """
    try:
        return frozenset(raw.decode("utf-8").split())
    except UnicodeDecodeError:
        raise PushProtocolError("capabilities are not UTF-8") from None


def _oid(raw: bytes) -> str:
    """
    Check a hex object id.
    """
    if not _OID.match(raw):
        raise PushProtocolError(f"malformed object id {raw[:80]!r}")
    return raw.decode("ascii")


def _is_zero(oid: str) -> bool:
    """
    Whether an object id is the all-zeros null id.
    """
    return oid.strip("0") == ""
