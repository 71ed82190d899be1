"""Stream tokens (synapse/types StreamToken, as far as one linear server needs them).

Sync tokens are ``s{stream}_{typing}``: the global stream position (events, account data,
receipts) and the typing serial. Pagination tokens (prev_batch, /messages) are ``s{stream}``;
because rooms are linear, "the token before event N" is just ``s{N-1}`` within that room.
"""

from __future__ import annotations

import attrs

from cis_bot.homeserver.errors import MatrixError, bad_request

MAX_POSITION = 2**63 - 1  # SQLite's INTEGER


@attrs.frozen
class SyncToken:
    stream: int
    typing: int

    def __str__(self) -> str:
        return f"s{self.stream}_{self.typing}"

    @classmethod
    def parse(cls, raw: str) -> SyncToken:
        try:
            if not raw.startswith("s"):
                raise ValueError(raw)
            stream, _, typing = raw[1:].partition("_")
            return cls(_position(stream), _position(typing or "0"))
        except ValueError:
            raise bad_request("Invalid stream token") from None


def _position(text: str) -> int:
    """A stream position in a token: a decimal that fits SQLite's 64-bit INTEGER."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(text)
    position = int(text)
    if position > MAX_POSITION:
        raise ValueError(text)
    return position


def is_pagination_token(raw: str) -> bool:
    try:
        parse_pagination_token(raw)
    except MatrixError:
        return False
    return True


def parse_pagination_token(raw: str) -> int:
    """``s{N}`` (ours), or a sync token ``s{N}_{typing}``; ``t{topo}-{N}`` is accepted too."""
    try:
        if raw.startswith("t") and "-" in raw:
            return _position(raw.split("-", 1)[1].split("_", 1)[0])
        if raw.startswith("s"):
            return _position(raw[1:].split("_", 1)[0])
    except ValueError:
        pass
    raise bad_request(f"Invalid stream token {raw!r}")
