from typing import Final

class RequestInfo:
    host: Final[bytes | None]
    content_length: Final[int]
    chunked: Final[bool]
    expect_continue: Final[bool]
    expect_other: Final[bool]
    upgrade: Final[bytes | None]
    request_id: Final[bytes | None]
    connection_close: Final[bool]

class ResponseHead:
    status: Final[int]
    version: Final[int]
    head: Final[bytes]
    end: Final[int]
    body_mode: Final[int]
    content_length: Final[int]
    keep_alive: Final[bool]
    te: Final[bytes | None]

class ChunkedScanner:
    done: Final[bool]
    def __init__(self, decode: bool = ..., max_line: int = ..., max_trailers: int = ...) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview, start: int = ...) -> int: ...
    def take(self) -> bytes: ...

class CheckedHeader(tuple[bytes, bytes]):
    """A (name, value) pair checked when made; build_request_head copies it without checking again."""
    def __new__(cls, name: bytes, value: bytes) -> CheckedHeader: ...

def scan_request(headers: list[tuple[bytes, bytes]]) -> RequestInfo: ...
def find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None: ...
def build_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], host: bytes,
                       client_ip: bytes, proto: bytes, request_id: bytes, drop: frozenset[bytes],
                       add: tuple[tuple[bytes, bytes], ...], body_mode: int, content_length: int,
                       upgrade: bool) -> bytes: ...
def scan_response_head(data: bytes | bytearray | memoryview, start: int, head_request: bool,
                       max_size: int) -> ResponseHead | None: ...
def ascii_ieq(data: bytes, lowercase: bytes) -> bool: ...
def valid_header_name(name: bytes) -> bool: ...
def valid_header_value(value: bytes) -> bool: ...
def remove_headers(head: bytes, names: frozenset[bytes] | set[bytes]) -> bytes:
    """`head` without the header lines whose lowercased name is in `names` (`head` itself if none)."""
