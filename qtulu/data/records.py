"""Reading raw source files record by record, and what happens to a record that is bad.

Every record comes with its location (`file:line`), so an error can name it. JSON arrays are
parsed incrementally (the full ShareGPT export is ~600 MB; we never hold its text twice).
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtulu.errors import QtuluError

DATA_SUFFIXES = (".json", ".jsonl", ".tsv", ".parquet", ".json.gz", ".jsonl.gz", ".tsv.gz")
ON_ERROR = ("raise", "skip")


class BadRecord(Exception):
    """A record that does not fit its source's format: which field, and what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass
class Report:
    """Counts what a conversion produced, dropped (the recipe's rules) and skipped (bad records).

    With on_error="raise" a bad record stops everything with a one-line QtuluError naming file,
    line and field; with "skip" it is counted by reason and the conversion goes on.
    """

    on_error: str = "raise"
    converted: Counter = field(default_factory=Counter)  # source -> records written
    dropped: Counter = field(default_factory=Counter)  # "source: reason" -> count
    skipped: Counter = field(default_factory=Counter)  # "source: field: problem" -> count
    notes: list[str] = field(default_factory=list)

    def bad(self, source: str, where: str, err: BadRecord) -> None:
        if self.on_error != "skip":
            raise QtuluError(f"{where}: {err.field}: {err.problem}; fix the record or pass --on-error skip")
        self.skipped[f"{source}: {err.field}: {err.problem}"] += 1

    def drop(self, source: str, reason: str, n: int = 1) -> None:
        self.dropped[f"{source}: {reason}"] += n

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)


def data_files(folder: Path) -> list[Path]:
    """The data files of a source folder (recursively), sorted; licences and readmes are not data."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES) and not p.name.startswith(".")
    )


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_records(path: Path) -> Iterator[tuple[Any, str]]:
    """Yield (record, "file:line") for a JSON array, a single JSON object, JSONL, TSV or parquet file."""
    if not path.is_file():
        raise QtuluError(f"{path}: file does not exist; check the path")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif name.endswith(".tsv"):
        yield from _iter_tsv(path)
    elif name.endswith(".jsonl"):
        yield from _iter_jsonl(path)
    else:
        yield from _iter_json(path)


def _bad_json(path: Path, line: int, e: json.JSONDecodeError | str) -> QtuluError:
    msg = e.msg if isinstance(e, json.JSONDecodeError) else e
    return QtuluError(f"{path}:{line}: json: not valid JSON ({msg}); fix the file or re-download it")


def _iter_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{n}"
            except json.JSONDecodeError as e:
                raise _bad_json(path, n, e) from None


def _iter_tsv(path: Path) -> Iterator[tuple[Any, str]]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line:
                yield line.split("\t"), f"{path}:{n}"


def _iter_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError for broken files
        raise QtuluError(f"{path}: not a readable parquet file ({type(e).__name__}); re-download it") from None
    row = 0
    for batch in reader.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield record, f"{path}:row {row}"


def _iter_json(path: Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[Any, str]]:
    """A JSON array parsed element by element, a single JSON object, or JSONL saved as .json."""
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        buf = f.read(chunk_chars)
        pos = _skip_space(buf, 0)
        if pos == len(buf):
            raise _bad_json(path, 1, "the file is empty")
        if buf[pos] != "[":  # one object (a super_ni task), or JSONL written with a .json name
            yield from _single_or_jsonl(path, buf + f.read(), pos, decoder)
            return
        # `line` is the line number at buffer position `counted`; buffer text before `pos` is consumed.
        line, counted, pos, eof = 1, 0, pos + 1, False

        def refill(want: int):
            nonlocal buf, line, counted, pos, eof
            line += buf.count("\n", counted, pos)
            more = f.read(want) if want else ""
            eof = eof or (want > 0 and not more)
            buf, counted, pos = buf[pos:] + more, 0, 0

        while True:
            pos = _skip_space(buf, pos)
            if pos == len(buf):
                if eof:
                    raise _bad_json(path, line + buf.count("\n", counted, pos), "the array is not closed with ]")
                refill(chunk_chars)
                continue
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise _bad_json(path, line + buf.count("\n", counted, e.pos), e) from None
                # Maybe the element is cut by the chunk's end: read more (doubling, so a huge
                # element or a real error late in the file costs linear time) and try again.
                refill(max(chunk_chars, len(buf)))
                continue
            line += buf.count("\n", counted, pos)
            counted = pos
            yield obj, f"{path}:{line}"
            pos = _skip_space(buf, end)
            if pos < len(buf) and buf[pos] == ",":
                pos += 1
            elif pos < len(buf) and buf[pos] != "]":
                raise _bad_json(path, line + buf.count("\n", counted, pos), "expected , or ] between elements")
            if pos > chunk_chars:  # drop consumed text now and then, not on every element
                refill(0)


def _single_or_jsonl(path: Path, text: str, pos: int, decoder: json.JSONDecoder) -> Iterator[tuple[Any, str]]:
    try:
        obj, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise _bad_json(path, e.lineno, e) from None
    if _skip_space(text, end) == len(text):
        yield obj, f"{path}:{1 + text.count(chr(10), 0, pos)}"
    else:
        yield from _iter_jsonl(path)


def _skip_space(buf: str, pos: int) -> int:
    n = len(buf)
    while pos < n and buf[pos] in " \t\r\n":
        pos += 1
    return pos


# ---------------------------------------------------------------------------------------------
# Field access with errors that say what is wrong


def get_str(record: Any, key: str, required: bool = True, empty_ok: bool = False) -> str:
    """record[key] as a string; BadRecord if it is missing, not a string, or empty (unless allowed)."""
    if not isinstance(record, dict):
        raise BadRecord("record", f"expected a JSON object, got {type(record).__name__}")
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(key, "missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(key, f"expected a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise BadRecord(key, "empty")
    return value


def get_list(record: Any, key: str) -> list:
    if not isinstance(record, dict):
        raise BadRecord("record", f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise BadRecord(key, "missing")
    value = record[key]
    if not isinstance(value, list):
        raise BadRecord(key, f"expected a list, got {type(value).__name__}")
    return value


ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict]:
    """Validate a converted conversation: known roles, non-empty text, user/assistant alternating,
    an optional system turn first, ending with the assistant. Returns it; raises BadRecord."""
    if not isinstance(messages, list):
        raise BadRecord("messages", f"expected a list, got {type(messages).__name__}")
    if not messages:
        raise BadRecord("messages", "empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"messages[{i}]", f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise BadRecord(f"messages[{i}].role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise BadRecord(f"messages[{i}].content", "missing" if content is None else "expected a string")
        if not content.strip():
            raise BadRecord(f"messages[{i}].content", "empty message")
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord(
                f"messages[{i}].role",
                f"expected {want} (turns alternate user/assistant, an optional system turn first)",
            )
    if messages[-1]["role"] != "assistant":
        raise BadRecord("messages", "the last turn must be the assistant's")
    return messages
