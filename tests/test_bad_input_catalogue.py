"""Each bad input in the catalogue gets a message that says what it must, and
docs/bad-inputs.md shows those messages."""

from __future__ import annotations

import re
from pathlib import Path

from tests.bad_input_catalogue import CASES, collect

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
_ROW = re.compile(r"^\| (.+?) \| (.+) \|$")


def documented() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match and match.group(1) not in ("bad input", "---"):
            rows[match.group(1)] = match.group(2).replace("\\|", "|")
    return rows


def test_every_bad_input_is_explained_and_documented(tmp_path: Path) -> None:
    rows = collect(tmp_path)
    vague = [
        (row.case.what, fragment, row.message)
        for row in rows
        for fragment in row.case.expect
        if fragment not in row.message
    ]
    assert vague == []
    assert not [row.case.what for row in rows if row.message == "(accepted)"]
    # The document shows what users get. Its wording may trail a library's own text (OpenSSL's,
    # cryptography's) by a version, but our part of each message must be the same.
    doc = documented()
    stale = [
        row.case.what
        for row in rows
        if row.case.what not in doc
        or doc[row.case.what][:40] != row.message[:40]
        or any(fragment not in doc[row.case.what] for fragment in row.case.expect)
    ]
    assert stale == [], "docs/bad-inputs.md is out of date: python3 -m tests.bad_input_catalogue > docs/bad-inputs.md"
    print(f"\n{len(CASES)} bad inputs tried")
