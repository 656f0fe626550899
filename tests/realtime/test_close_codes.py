"""The close codes docs/protocol.md lists are exactly the ones the server sends."""

from __future__ import annotations

import re
from pathlib import Path

from realtime.close_codes import CloseCode

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_codes(text: str) -> list[int]:
    """The first column of the table headed ``| close code | when |``."""
    lines = iter(text.splitlines())
    for line in lines:
        if re.fullmatch(r"\|\s*close code\s*\|\s*when\s*\|", line.strip()):
            break
    else:
        raise AssertionError("no close code table in docs/protocol.md")
    next(lines)  # |---|---|
    codes = []
    for line in lines:
        if not line.startswith("|"):
            break
        codes.append(int(line.split("|")[1]))
    return codes


def test_the_docs_table_lists_every_close_code_once() -> None:
    codes = documented_codes(PROTOCOL_MD.read_text())
    assert len(codes) == len(set(codes))
    assert sorted(codes) == sorted(code.value for code in CloseCode)


def test_an_alias_shares_its_code() -> None:
    assert CloseCode.REFUSED is CloseCode.POLICY
