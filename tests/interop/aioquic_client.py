#!/usr/bin/env python3
"""An interoperability client for the nearby protocol on aioquic (not quinn).

Written from docs/protocol.md alone: QUIC + TLS 1.3 with ALPN `nearby/1`, one bidirectional
control stream opened by the client, one unidirectional event stream opened by the node after
`Hello`, frames of a u32 big-endian length and a bincode-2 (`standard()`) payload.

    aioquic_client.py --addr HOST:PORT --ca CA_PEM --server-name NAME \
        --user U --friend F --lat LAT --lon LON [--timeout S]

Logs in with `DevLogin` (a dev node), says `Hello`, asks F to be friends, sends one location,
then waits on the event stream for a `FriendEntered` or `FriendMoved` about F. Prints exactly
one JSON line on stdout: `{"ok": true, "event": ..., "friend": F, "lat": ..., "lon": ...,
"distance_m": ...}` and exits 0, or `{"ok": false, "error": "..."}` and exits 1. Progress goes
to stderr.

`--self-test` checks the encoder and decoder against the byte examples of section 4.1 of
docs/protocol.md and exits (no network).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import ssl
import struct
import sys
import time
from typing import Any

PROTOCOL_VERSION = 2
ALPN = "nearby/1"
MAX_FRAME_LEN = 64 * 1024
CLIENT_NAME = "aioquic-interop"

# Error codes travel as their number (section 8).
ERROR_NAMES = {
    1: "bad_frame",
    2: "frame_too_large",
    3: "unsupported_version",
    4: "not_authenticated",
    5: "token_expired",
    6: "token_invalid",
    7: "forbidden",
    8: "invalid_coordinates",
    9: "unknown_user",
    10: "invalid_argument",
    11: "rate_limited",
    12: "unavailable",
    13: "internal",
    14: "not_started",
    15: "already_authenticated",
    16: "too_many_sessions",
}
RATE_LIMITED, UNAVAILABLE = 11, 12

OUTCOMES = [
    "Updated",
    "Unchanged",
    "FriendRequestSent",
    "FriendshipFormed",
    "AlreadyFriends",
    "FriendRemoved",
]
RELATIONS = ["Friend", "RequestReceived", "RequestSent", "Follower", "Following"]
GONE_REASONS = ["Inactive", "Unfriended", "Hidden"]


class ProtocolError(Exception):
    """Bytes that are not a valid frame or message: the connection must be closed (code 1)."""


class RequestFailed(Exception):
    """The node answered a request with `Error`."""

    def __init__(self, request: str, code: int, message: str):
        self.code = code
        name = ERROR_NAMES.get(code, "unknown")
        super().__init__(f"{request}: {name} ({code}): {message}")


# --- encoding (section 4) -------------------------------------------------------------------


class Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, v: int) -> "Writer":
        if v < 0:
            raise ValueError("no signed integers in the protocol")
        if v < 251:
            self.out.append(v)
        elif v < 1 << 16:
            self.out += b"\xfb" + struct.pack("<H", v)
        elif v < 1 << 32:
            self.out += b"\xfc" + struct.pack("<I", v)
        elif v < 1 << 64:
            self.out += b"\xfd" + struct.pack("<Q", v)
        else:
            raise ValueError("integer too large for u64")
        return self

    def f64(self, v: float) -> "Writer":
        self.out += struct.pack("<d", v)
        return self

    def string(self, s: str) -> "Writer":
        b = s.encode("utf-8")
        self.varint(len(b))
        self.out += b
        return self

    def bool(self, v: bool) -> "Writer":
        self.out.append(1 if v else 0)
        return self


# Request variant numbers (section 5.2).
REQ_HELLO, REQ_UPDATE_LOCATION, REQ_ADD_FRIEND, REQ_PING, REQ_DEV_LOGIN = 0, 1, 4, 11, 12


def request_frame(rid: int, variant: int, body: bytes = b"") -> bytes:
    """One framed `RequestFrame { id, request }` whose request fields are already encoded."""
    w = Writer().varint(rid).varint(variant)
    payload = bytes(w.out) + body
    if len(payload) > MAX_FRAME_LEN:
        raise ValueError("frame too large")
    return struct.pack(">I", len(payload)) + payload


def hello(version: int, user: int, token: str, client: str) -> tuple[int, bytes]:
    return REQ_HELLO, bytes(Writer().varint(version).varint(user).string(token).string(client).out)


def update_location(lat: float, lon: float) -> tuple[int, bytes]:
    return REQ_UPDATE_LOCATION, bytes(Writer().f64(lat).f64(lon).out)


def add_friend(user: int) -> tuple[int, bytes]:
    return REQ_ADD_FRIEND, bytes(Writer().varint(user).out)


def dev_login(user: int) -> tuple[int, bytes]:
    return REQ_DEV_LOGIN, bytes(Writer().varint(user).out)


def ping() -> tuple[int, bytes]:
    return REQ_PING, b""


REQUEST_NAMES = {
    REQ_HELLO: "Hello",
    REQ_UPDATE_LOCATION: "UpdateLocation",
    REQ_ADD_FRIEND: "AddFriend",
    REQ_PING: "Ping",
    REQ_DEV_LOGIN: "DevLogin",
}


# --- decoding (section 4) -------------------------------------------------------------------


class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("truncated message")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def varint(self, bits: int = 64) -> int:
        """An unsigned varint of a declared width (a u16 may not use the u32/u64 markers)."""
        first = self.take(1)[0]
        if first < 251:
            return first
        widths = {0xFB: 16, 0xFC: 32, 0xFD: 64}
        width = widths.get(first)
        if width is None:
            raise ProtocolError(f"bad varint marker {first:#x}")
        if width > bits:
            raise ProtocolError(f"varint marker {first:#x} too wide for a u{bits}")
        return int.from_bytes(self.take(width // 8), "little")

    def u16(self) -> int:
        return self.varint(16)

    def u32(self) -> int:
        return self.varint(32)

    def u64(self) -> int:
        return self.varint(64)

    def variant(self, count: int, what: str) -> int:
        v = self.varint(32)
        if v >= count:
            raise ProtocolError(f"unknown {what} variant {v}")
        return v

    def f64(self) -> float:
        return struct.unpack("<d", self.take(8))[0]

    def bool(self) -> bool:
        b = self.take(1)[0]
        if b > 1:
            raise ProtocolError(f"bad bool {b}")
        return b == 1

    def string(self) -> str:
        n = self.u64()
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"invalid UTF-8: {e}") from None

    def option(self, read) -> Any:
        tag = self.take(1)[0]
        if tag == 0:
            return None
        if tag == 1:
            return read()
        raise ProtocolError(f"bad option tag {tag}")

    def vec(self, read) -> list:
        n = self.u64()
        if n > len(self.data) - self.pos:  # every element takes at least one byte
            raise ProtocolError("vector longer than the frame")
        return [read() for _ in range(n)]

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} trailing bytes")


def coord(r: Reader) -> dict:
    return {"lat": r.f64(), "lon": r.f64()}


def nearby_page(r: Reader) -> dict:
    def friend() -> dict:
        return {
            "id": r.u64(),
            "relation": RELATIONS[r.variant(len(RELATIONS), "Relation")],
            "name": r.string(),
            "distance_m": r.f64(),
            "updated_at": r.u64(),
        }

    return {"friends": r.vec(friend), "next": r.option(r.string)}


def stranger(r: Reader) -> dict:
    return {
        "pseudonym": r.string(),
        "name": r.string(),
        "distance_m": r.u32(),
        "updated_at": r.u64(),
    }


def decode_response(payload: bytes) -> tuple[int, str, dict]:
    """A `ResponseFrame`: (id, response variant name, fields)."""
    r = Reader(payload)
    rid = r.u64()
    v = r.variant(13, "Response")
    if v == 0:
        name, f = "Welcome", {
            "user": r.u64(),
            "radius_m": r.u32(),
            "ttl_s": r.u32(),
            "page_size": r.u16(),
            "next_update_s": r.u32(),
        }
    elif v == 1:
        name, f = "Started", {"page": nearby_page(r), "next_update_s": r.u32()}
    elif v == 2:
        name, f = "Located", {"next_update_s": r.u32()}
    elif v == 3:
        name, f = "Nearby", nearby_page(r)
    elif v == 4:

        def entry() -> dict:
            return {
                "id": r.u64(),
                "name": r.option(r.string),
                "relation": RELATIONS[r.variant(len(RELATIONS), "Relation")],
                "hidden": r.bool(),
            }

        name, f = "Friends", {
            "entries": r.vec(entry),
            "sharing": r.bool(),
            "discoverable": r.bool(),
            "ghost_until": r.option(r.u64),
            "history": r.bool(),
            "next": r.option(r.u64),
        }
    elif v == 5:
        name, f = "Done", {"outcome": OUTCOMES[r.variant(len(OUTCOMES), "Outcome")]}
    elif v == 6:
        name, f = "Pong", {}
    elif v == 7:
        name, f = "Error", {"code": r.u16(), "message": r.string()}
        if f["code"] not in ERROR_NAMES:
            raise ProtocolError(f"unknown error code {f['code']}")
    elif v == 8:
        name, f = "Redirect", {"addr": r.string(), "reason": r.string()}
    elif v == 9:
        name, f = "Token", {"token": r.string(), "expires_at": r.u64()}
    elif v == 10:
        name, f = "Ghost", {"until": r.option(r.u64)}
    elif v == 11:
        name, f = "Strangers", {"strangers": r.vec(lambda: stranger(r)), "more": r.u32()}
    else:

        def point() -> dict:
            return {"at": coord(r), "recorded_at": r.u64()}

        name, f = "History", {
            "points": r.vec(point),
            "more": r.bool(),
            "complete": r.bool(),
        }
    r.finish()
    return rid, name, f


def decode_event(payload: bytes) -> tuple[str, dict]:
    """An `Event`: (variant name, fields)."""
    r = Reader(payload)
    v = r.variant(10, "Event")
    if v in (0, 1):
        name = "FriendMoved" if v == 0 else "FriendEntered"
        f = {"id": r.u64(), "at": coord(r), "distance_m": r.f64(), "updated_at": r.u64()}
    elif v == 2:
        name, f = "FriendLeft", {"id": r.u64(), "distance_m": r.f64(), "updated_at": r.u64()}
    elif v == 3:
        name, f = "FriendGone", {
            "id": r.u64(),
            "reason": GONE_REASONS[r.variant(len(GONE_REASONS), "GoneReason")],
        }
    elif v == 4:
        name, f = "FriendRequest", {"from": r.u64()}
    elif v == 5:
        name, f = "Cadence", {"next_update_s": r.u32()}
    elif v == 6:
        name, f = "Shutdown", {"reconnect_after_ms": r.u32(), "redirect": r.option(r.string)}
    elif v == 7:
        name, f = "StrangerNearby", stranger(r)
    elif v == 8:
        name, f = "StrangerGone", {"pseudonym": r.string()}
    else:
        name, f = "TokenExpiring", {"expires_at": r.u64()}
    r.finish()
    return name, f


class FrameBuffer:
    """Bytes read from one stream, cut into frame payloads by their length prefix."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def extend(self, data: bytes) -> None:
        self.buf += data

    def next_payload(self) -> bytes | None:
        if len(self.buf) < 4:
            return None
        (n,) = struct.unpack(">I", self.buf[:4])
        if n > MAX_FRAME_LEN:  # checked before waiting for the payload
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME_LEN}-byte limit")
        if len(self.buf) < 4 + n:
            return None
        payload = bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        return payload

    def pending(self) -> int:
        return len(self.buf)


# --- the connection -------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"aioquic-client: {msg}", file=sys.stderr, flush=True)


def make_protocol_class():
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.quic import events

    class NearbyProtocol(QuicConnectionProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.control_id: int | None = None
            self.control = FrameBuffer()
            self.event_bufs: dict[int, FrameBuffer] = {}
            self.responses: asyncio.Queue = asyncio.Queue()
            self.events: asyncio.Queue = asyncio.Queue()
            self.closed_why: str | None = None

        def fail(self, why: str) -> None:
            """Ends both queues with `why`."""
            if self.closed_why is None:
                self.closed_why = why
            self.responses.put_nowait(ConnectionError(why))
            self.events.put_nowait(ConnectionError(why))

        def protocol_error(self, why: str) -> None:
            # Section 3: a client that receives a frame it cannot decode closes with code 1.
            self.fail(f"protocol error: {why}")
            self.close(error_code=1, reason_phrase="bad_frame")

        def quic_event_received(self, event) -> None:
            if isinstance(event, events.StreamDataReceived):
                sid = event.stream_id
                try:
                    if sid == self.control_id:
                        self.control.extend(event.data)
                        while (p := self.control.next_payload()) is not None:
                            self.responses.put_nowait(decode_response(p))
                        if event.end_stream:
                            left = self.control.pending()
                            self.fail(f"the node finished the control stream ({left} bytes left over)")
                    elif sid % 4 == 3:  # a server-initiated unidirectional stream: events
                        buf = self.event_bufs.get(sid)
                        if buf is None:
                            log(f"the node opened event stream {sid}")
                            buf = self.event_bufs[sid] = FrameBuffer()
                        buf.extend(event.data)
                        while (p := buf.next_payload()) is not None:
                            self.events.put_nowait(decode_event(p))
                        if event.end_stream:
                            left = buf.pending()
                            self.events.put_nowait(
                                ConnectionError(f"the node finished the event stream {sid} ({left} bytes left over)")
                            )
                    else:
                        self.protocol_error(f"data on unexpected stream {sid}")
                except ProtocolError as e:
                    self.protocol_error(f"stream {sid}: {e}")
            elif isinstance(event, events.StreamReset):
                self.fail(f"the node reset stream {event.stream_id} (code {event.error_code})")
            elif isinstance(event, events.ConnectionTerminated):
                kind = "application" if event.frame_type is None else "transport"
                self.fail(
                    f"connection closed ({kind} code {event.error_code}, reason {event.reason_phrase!r})"
                )

        def open_control(self) -> None:
            self.control_id = self._quic.get_next_available_stream_id(is_unidirectional=False)

        def send(self, data: bytes) -> None:
            self._quic.send_stream_data(self.control_id, data, end_stream=False)
            self.transmit()

    return NearbyProtocol


class Session:
    def __init__(self, proto) -> None:
        self.proto = proto
        self.next_id = 1

    async def call(self, req: tuple[int, bytes]) -> tuple[str, dict]:
        """Sends one request and waits for its response: strictly one in flight."""
        variant, body = req
        rid = self.next_id
        self.next_id += 1
        self.proto.send(request_frame(rid, variant, body))
        got = await self.proto.responses.get()
        if isinstance(got, Exception):
            raise got
        gid, name, fields = got
        if gid != rid:
            if name == "Error":
                raise ConnectionError(
                    f"answer to request {rid} carries id {gid}: "
                    f"{ERROR_NAMES.get(fields['code'])} ({fields['code']}): {fields['message']}"
                )
            raise ProtocolError(f"answer {name} carries id {gid}, expected {rid}")
        if name == "Error":
            raise RequestFailed(REQUEST_NAMES.get(variant, str(variant)), fields["code"], fields["message"])
        return name, fields

    async def call_retrying(self, req, deadline: float, retry: tuple[int, ...] = (UNAVAILABLE,)):
        """`call`, again after a short pause while the node answers a retryable code."""
        pause = 0.1
        while True:
            try:
                return await self.call(req)
            except RequestFailed as e:
                if e.code == RATE_LIMITED:
                    # A refused update still starts the node's 250 ms pace (section 10).
                    pause = max(pause, 0.3)
                if e.code not in retry or time.monotonic() + pause > deadline:
                    raise
                log(f"{e}; retrying")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)


def expect(what: str, got: tuple[str, dict], *names: str) -> dict:
    name, fields = got
    if name not in names:
        raise ProtocolError(f"{what} answered {name} {fields}, expected {' or '.join(names)}")
    return fields


async def run(args) -> dict:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    host, _, port = args.addr.rpartition(":")
    host = host.strip("[]")
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=args.server_name,
        idle_timeout=60.0,
    )
    config.verify_mode = ssl.CERT_REQUIRED
    config.load_verify_locations(cafile=args.ca)  # this CA only (no certifi roots then)
    deadline = time.monotonic() + args.timeout
    proto_cls = make_protocol_class()
    made: list = []

    def create_protocol(*a, **k):
        made.append(proto_cls(*a, **k))
        return made[-1]

    ctx = connect(host, int(port), configuration=config, create_protocol=create_protocol)
    try:
        proto = await ctx.__aenter__()
    except ConnectionError:
        why = made[-1].closed_why if made and made[-1].closed_why else "connection closed"
        raise ConnectionError(f"handshake with {args.addr} failed: {why}") from None
    try:
        log(f"connected to {args.addr} (ALPN {ALPN}, server name {args.server_name})")
        proto.open_control()
        s = Session(proto)

        token = expect("DevLogin", await s.call_retrying(dev_login(args.user), deadline), "Token")
        log(f"DevLogin: token of {len(token['token'])} characters, expires at {token['expires_at']}")
        welcome = expect(
            "Hello",
            await s.call_retrying(hello(PROTOCOL_VERSION, args.user, token["token"], CLIENT_NAME), deadline),
            "Welcome",
        )
        if welcome["user"] != args.user:
            raise ProtocolError(f"Welcome for user {welcome['user']}, not {args.user}")
        log(f"Welcome {welcome}")
        outcome = expect("AddFriend", await s.call_retrying(add_friend(args.friend), deadline), "Done")
        log(f"AddFriend {args.friend}: {outcome['outcome']}")
        name, started = await s.call_retrying(
            update_location(args.lat, args.lon), deadline, retry=(UNAVAILABLE, RATE_LIMITED)
        )
        expect("UpdateLocation", (name, started), "Started", "Located")
        shown = [f["id"] for f in started.get("page", {}).get("friends", [])]
        log(f"UpdateLocation: {name}, next update in {started['next_update_s']} s, page {shown}")

        while True:
            got = await proto.events.get()
            if isinstance(got, Exception):
                raise got
            ev, fields = got
            if ev in ("FriendEntered", "FriendMoved") and fields["id"] == args.friend:
                log(f"event {ev} {fields}")
                result = {
                    "ok": True,
                    "event": ev,
                    "friend": fields["id"],
                    "lat": fields["at"]["lat"],
                    "lon": fields["at"]["lon"],
                    "distance_m": fields["distance_m"],
                    "updated_at": fields["updated_at"],
                    "start": name,
                    "add_friend": outcome["outcome"],
                }
                proto.close(error_code=0, reason_phrase="done")  # application close, code 0
                return result
            log(f"event {ev} {fields} (waiting for one about user {args.friend})")
    finally:
        try:
            await asyncio.wait_for(ctx.__aexit__(None, None, None), 2.0)
        except Exception:
            pass


# --- self-test against section 4.1 -------------------------------------------------------------


def self_test() -> None:
    h = bytes.fromhex

    def req(rid: int, r: tuple[int, bytes]) -> bytes:
        return request_frame(rid, *r)

    assert req(1, ping()) == h("00000002 01 0b"), "Ping"
    assert req(0, hello(2, 42, "v1.abc.xyz", "demo")) == h(
        "00000014 00 00 02 2a 0a 76312e6162632e78797a 04 64656d6f"
    ), "Hello"
    assert req(1234, update_location(52.520008, 13.404954)) == h(
        "00000014 fbd204 01 45d4449f8f424a40 cec4742156cf2a40"
    ), "UpdateLocation"
    assert req(7, add_friend(1000)) == h("00000005 07 04 fbe803"), "AddFriend"
    assert req(3, dev_login(5)) == h("00000003 03 0c 05"), "DevLogin"

    def parse_one(data: bytes) -> bytes:
        fb = FrameBuffer()
        fb.extend(data)
        p = fb.next_payload()
        assert p is not None and fb.pending() == 0
        return p

    welcome = decode_response(parse_one(h("0000000b 00 00 2a fb401f fb5802 14 00")))
    assert welcome == (0, "Welcome", {"user": 42, "radius_m": 8000, "ttl_s": 600, "page_size": 20, "next_update_s": 0}), welcome
    err = decode_response(parse_one(h("00000005 00 07 01 01 78")))
    assert err == (0, "Error", {"code": 1, "message": "x"}), err
    err = decode_response(parse_one(h("00000004 05 07 0f 00")))
    assert err == (5, "Error", {"code": 15, "message": ""}), err
    moved = decode_event(
        parse_one(
            h(
                "00000027 00 fc6a420f00 4ed1915cfe434a40 82734694f6c62a40 9a99999999ed9a40 fd7b8ae2ba9a010000"
            )
        )
    )
    assert moved[0] == "FriendMoved" and moved[1]["id"] == 1000042, moved
    assert math.isclose(moved[1]["at"]["lat"], 52.5312) and math.isclose(moved[1]["at"]["lon"], 13.3886), moved
    assert moved[1]["distance_m"] == 1723.4 and moved[1]["updated_at"] == 1764072000123, moved
    shutdown = decode_event(parse_one(h("00000005 06 fbdc05 00")))
    assert shutdown == ("Shutdown", {"reconnect_after_ms": 1500, "redirect": None}), shutdown

    # Frames split byte by byte and coalesced come out whole and in order.
    two = h("0000000b 00 00 2a fb401f fb5802 14 00") + h("00000004 05 07 0f 00")
    fb = FrameBuffer()
    out = []
    for b in two:
        fb.extend(bytes([b]))
        while (p := fb.next_payload()) is not None:
            out.append(decode_response(p)[1])
    assert out == ["Welcome", "Error"], out
    # Truncated, trailing and oversized frames are refused.
    for bad, why in [
        (h("00000003 00 07 01"), "truncated"),
        (h("00000006 00 07 01 01 78 00"), "trailing"),
    ]:
        try:
            decode_response(parse_one(bad))
        except ProtocolError:
            pass
        else:
            raise AssertionError(f"{why} frame accepted")
    fb = FrameBuffer()
    fb.extend(h("00010001"))
    try:
        fb.next_payload()
    except ProtocolError:
        pass
    else:
        raise AssertionError("oversized length accepted")
    print(json.dumps({"ok": True, "self_test": "passed"}))


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error is an error like any other: the one JSON line, exit 1."""
        self.print_usage(sys.stderr)
        print(json.dumps({"ok": False, "error": f"usage: {message}"}), flush=True)
        sys.exit(1)


def main() -> int:
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", help="the node's client endpoint, HOST:PORT")
    p.add_argument("--ca", help="PEM file of the certificate(s) to trust (a dev node's ca.pem)")
    p.add_argument("--server-name", default="localhost", help="TLS server name (SNI and verification)")
    p.add_argument("--user", type=int, help="the user to act as")
    p.add_argument("--friend", type=int, help="the friend whose event to wait for")
    p.add_argument("--lat", type=float)
    p.add_argument("--lon", type=float)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run (default 60)")
    p.add_argument("--self-test", action="store_true", help="check the codec against docs/protocol.md 4.1")
    args = p.parse_args()
    if args.self_test:
        self_test()
        return 0
    missing = [n for n in ("addr", "ca", "user", "friend", "lat", "lon") if getattr(args, n) is None]
    if missing:
        p.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))

    async def bounded() -> dict:
        return await asyncio.wait_for(run(args), args.timeout)

    try:
        result = asyncio.run(bounded())
    except asyncio.TimeoutError:
        result = {"ok": False, "error": f"timed out after {args.timeout} s"}
    except ImportError as e:
        result = {"ok": False, "error": f"aioquic is not importable: {e}"}
    except Exception as e:  # every failure becomes the one JSON line
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
