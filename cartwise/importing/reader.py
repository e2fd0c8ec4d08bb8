"""Rows of a CSV or JSON-lines file (optionally gzipped), each with its line number.

A line that cannot be read as a row (bad JSON, a CSV row with more fields than the header) is
returned as a `BadLine`, so the importer reports it with its number and goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

FORMATS = ("csv", "jsonl")


class FileError(ValueError):
    """The file as a whole cannot be read (missing, not text, no header)."""


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    reason: str
    detail: str
    text: str


def detect_format(path: Path, given: str | None) -> str:
    if given:
        return given
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv") or name.endswith(".tsv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise FileError(f"{path.name}: cannot tell the format from the name; give --format csv "
                    "or --format jsonl")


class Source:
    """One input file: its rows with line numbers, and how far into it reading has got."""

    def __init__(self, path: Path, fmt: str | None = None, encoding: str = "utf-8",
                 delimiter: str | None = None) -> None:
        if not path.is_file():
            raise FileError(f"{path}: no such file")
        self.path = path
        self.format = detect_format(path, fmt)
        self.encoding = encoding
        self.delimiter = delimiter or ("\t" if ".tsv" in path.name.lower() else ",")
        self.size = path.stat().st_size  # of the compressed file for .gz
        self._raw: io.BufferedReader | None = None

    def position(self) -> int:
        """Bytes of the file read so far (compressed bytes for .gz), for the progress bar."""
        try:
            return self._raw.tell() if self._raw is not None else 0
        except (OSError, ValueError):
            return self.size

    def rows(self) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
        """(line number, row or BadLine) for every data line; blank lines are left out."""
        with open(self.path, "rb") as raw:
            self._raw = raw
            binary: Any = gzip.GzipFile(fileobj=raw) if self.path.suffix == ".gz" else raw
            f = io.TextIOWrapper(binary, encoding=self.encoding, newline="")
            try:
                if self.format == "jsonl":
                    yield from _jsonl(f)
                else:
                    yield from _csv(f, self.delimiter)
            except UnicodeDecodeError as exc:
                raise FileError(f"{self.path.name}: not {self.encoding} text ({exc.reason}); "
                                "give --encoding (e.g. --encoding latin-1)") from None
            except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
                raise FileError(f"{self.path.name}: cannot be read: {exc}") from None


def _jsonl(f: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            yield n, BadLine(n, "bad_json", str(err)[:200], line.rstrip("\r\n"))
            continue
        if not isinstance(d, dict):
            yield n, BadLine(n, "not_an_object", "a line must be a JSON object",
                             line.rstrip("\r\n"))
            continue
        yield n, d


def _csv(f: io.TextIOBase, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = [h.strip().lstrip("\ufeff") for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as exc:
        raise FileError(f"the header line cannot be read: {exc}") from None
    if not any(header):
        raise FileError("the first line (the header) is empty")
    width = len(header)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, BadLine(reader.line_num, "bad_csv", str(exc), "")
            continue
        n = reader.line_num
        if not values or (len(values) == 1 and not values[0].strip()):
            continue
        if len(values) != width:
            yield n, BadLine(n, "bad_csv", f"{len(values)} fields, the header has {width}",
                             delimiter.join(values))
            continue
        yield n, dict(zip(header, values, strict=True))
