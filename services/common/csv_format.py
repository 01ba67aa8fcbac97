"""The input CSV reader and the output CSV writer (docs/usage.md: the input and output CSV).

`CsvReader` is a push parser: ingest feeds it the upload chunk by chunk as the bytes arrive and
gets back validated `ProductRow`s, so a file is never held whole in memory. Every problem is
reported with the spreadsheet row (the header is row 1) and the column it concerns.

`OutputCsvWriter` renders the result file, neutralising every cell against spreadsheet
formula injection.

Both are pure and synchronous: no I/O besides the bytes passed in and the file object passed in.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

REQUIRED_COLUMNS = ("S. No.", "Product Name", "Input Image Urls")
OUTPUT_COLUMNS = (
    "S. No.",
    "Product Name",
    "Input Image Urls",
    "Output Image Urls",
    "Errors",
    "SSIM",
)

_SERIAL, _NAME, _URLS = REQUIRED_COLUMNS

# A record ends at a newline outside quotes. RFC 4180 doubles quotes inside a quoted field, so
# "outside quotes" is simply "an even number of quotes since the record started".
_RECORD_BOUNDARY = re.compile(r'["\n]')
# \s covers Unicode whitespace; the ranges are the C0 controls, DEL and the C1 controls.
_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SHOWN_CHARS = 80


@dataclass(frozen=True, slots=True)
class CsvLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_rows: int = 100_000  # product rows, header excluded
    max_urls_per_row: int = 100
    max_urls_total: int = 500_000
    max_url_length: int = 2048
    max_problems: int = 100  # stop collecting problems after this many


@dataclass(frozen=True, slots=True)
class CsvProblem:
    row: int  # spreadsheet row: the header is row 1, the first product row 2
    column: str  # a canonical column name, or "" when it concerns the whole row or file
    message: str


@dataclass(frozen=True, slots=True)
class ProductRow:
    row_number: int
    serial_number: str
    product_name: str
    image_urls: tuple[str, ...]


class CsvReader:
    """Push parser: `feed(bytes)` as chunks arrive, then `finish()` once.

    Chunks may be split anywhere (inside a UTF-8 character, a CRLF or a quoted cell). Memory
    holds one chunk and the record in progress (which `max_bytes` bounds); it does not grow with
    the number of rows. So the one rule that needs every row, unique serial numbers, is not
    checked here: ingest asks Postgres once the rows are stored (`duplicate_serial`).
    Rows are numbered as physical records: a quoted cell spanning lines is still one row, and
    blank lines are skipped but counted.
    """

    def __init__(self, limits: CsvLimits = CsvLimits()) -> None:
        self._limits = limits
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bytes_decoded = 0
        self._bom_pending = True
        self._pieces: list[str] = []  # text of the record in progress
        self._in_quotes = False
        self._records = 0  # physical records completed, blank ones included
        self._header_row: int | None = None
        self._columns: tuple[int, int, int] | None = None  # None: no valid header (yet)
        self._problems: list[CsvProblem] = []
        self._problem_count = 0  # including the ones not kept
        self._stopped = False
        self._finished = False
        self._rows_seen = 0
        self._urls_seen = 0
        self._bytes_seen = 0
        self._exceeded: str | None = None
        # The URL cell of a legal row can exceed csv's default 128 KiB field limit (100 URLs of
        # 2048 characters). The limit is process-wide, so only ever raise it.
        needed = limits.max_urls_per_row * (limits.max_url_length + 1) + 1024
        if csv.field_size_limit() < needed:
            csv.field_size_limit(needed)

    @property
    def problems(self) -> list[CsvProblem]:
        """The problems found so far, in file order, at most `limits.max_problems`."""
        return list(self._problems)

    @property
    def truncated(self) -> bool:
        """True when more problems existed than were kept."""
        return self._problem_count > len(self._problems)

    @property
    def ok(self) -> bool:
        """True while no problem has been found."""
        return self._problem_count == 0

    @property
    def exceeded(self) -> str | None:
        """The `CsvLimits` field of the first size limit the file crossed (`max_rows`, ...),
        even when its problem was not kept; None while the file is within every limit."""
        return self._exceeded

    @property
    def rows_seen(self) -> int:
        """Product rows read (header and blank lines excluded)."""
        return self._rows_seen

    @property
    def urls_seen(self) -> int:
        return self._urls_seen

    @property
    def bytes_seen(self) -> int:
        """Bytes fed so far, including any past a limit."""
        return self._bytes_seen

    def feed(self, chunk: bytes) -> list[ProductRow]:
        """Parse the next chunk and return the rows it completed.

        Every valid row is returned, even after a problem elsewhere (a file with problems is
        rejected whole, but ingest checks the stored rows' serial numbers for duplicates: the
        report then names them too). It goes on finding problems until `limits.max_problems`
        is exceeded or a file-level limit stops it.
        """
        if self._finished:
            raise RuntimeError("CsvReader.feed() called after finish()")
        rows: list[ProductRow] = []
        before = self._bytes_seen
        self._bytes_seen += len(chunk)
        if self._stopped:
            return rows
        allowed = self._limits.max_bytes - before
        too_big = len(chunk) > allowed
        self._decode(chunk[:allowed] if too_big else chunk, final=False, out=rows)
        if too_big and not self._stopped:
            self._add(
                self._records + 1,
                "",
                f"file too large: the limit is {self._limits.max_bytes} bytes",
                limit="max_bytes",
            )
            self._stop()
        return rows

    def finish(self) -> list[ProductRow]:
        """Flush the last record (a final newline is optional) and check the file as a whole.

        Adds "the file is empty" (row 1) when no non-blank record was found, and
        "no product rows" (the row after the header) when the header stood alone.
        """
        if self._finished:
            return []
        self._finished = True
        rows: list[ProductRow] = []
        if not self._stopped:
            self._decode(b"", final=True, out=rows)
        if not self._stopped and self._pieces:
            record = "".join(self._pieces)
            self._pieces.clear()
            self._record(record, rows)
        if self._stopped:
            return rows
        if self._header_row is None:
            self._add(1, "", "the file is empty")
        elif self._columns is not None and self._rows_seen == 0:
            self._add(self._header_row + 1, "", "no product rows")
        return rows

    def _decode(self, data: bytes, *, final: bool, out: list[ProductRow]) -> None:
        pending = self._decoder.getstate()[0]
        # Offsets in a decode error count from the start of the bytes the decoder held back.
        base = self._bytes_decoded - len(pending)
        self._bytes_decoded += len(data)
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            # Read the valid part first so the error lands on the row that holds the bad byte.
            self._consume(exc.object[: exc.start].decode("utf-8"), out)
            if not self._stopped:
                offset = base + exc.start
                self._add(self._records + 1, "", f"not valid UTF-8 (byte offset {offset})")
                self._stop()
            return
        self._consume(text, out)

    def _consume(self, text: str, out: list[ProductRow]) -> None:
        if self._bom_pending and text:
            self._bom_pending = False
            if text[0] == "\ufeff":
                text = text[1:]
        # Only the new text is scanned and the record in progress is kept as pieces joined
        # once, so a cell spanning many chunks costs linear time, not quadratic.
        start = 0
        for match in _RECORD_BOUNDARY.finditer(text):
            if match.group() == '"':
                self._in_quotes = not self._in_quotes
            elif not self._in_quotes:
                self._pieces.append(text[start : match.end()])
                start = match.end()
                record = "".join(self._pieces)
                self._pieces.clear()
                self._record(record, out)
                if self._stopped:
                    return
        if start < len(text):
            self._pieces.append(text[start:])

    def _record(self, record: str, out: list[ProductRow]) -> None:
        self._records += 1
        row = self._records
        if self._header_row is not None and self._columns is None:
            return  # invalid header: nothing to validate against, only count rows
        try:
            cells = next(csv.reader([record], strict=True), [])
        except csv.Error as exc:
            if self._header_row is None:
                self._header_row = row  # a broken header is still the header
            else:
                self._rows_seen += 1  # a broken product row is still a product row
            self._add(row, "", f"malformed CSV: {_csv_error_text(exc)}")
            return
        if not any(cell.strip() for cell in cells):
            return  # blank line (spreadsheets also export empty rows as ",,")
        if self._header_row is None:
            self._header_row = row
            self._read_header(row, cells)
        else:
            self._read_product(row, cells, out)

    def _read_header(self, row: int, cells: list[str]) -> None:
        wanted = {_header_key(name): name for name in REQUIRED_COLUMNS}
        positions: dict[str, int] = {}
        duplicated = False
        for index, cell in enumerate(cells):
            name = wanted.get(_header_key(cell))
            if name is None:
                continue  # extra columns are ignored
            if name in positions:
                duplicated = True
                first, this = positions[name] + 1, index + 1
                self._add(row, name, f"duplicate column (columns {first} and {this})")
            else:
                positions[name] = index
        for name in REQUIRED_COLUMNS:
            if name not in positions:
                self._add(row, name, "missing required column")
        if not duplicated and len(positions) == len(REQUIRED_COLUMNS):
            self._columns = (positions[_SERIAL], positions[_NAME], positions[_URLS])

    def _read_product(self, row: int, cells: list[str], out: list[ProductRow]) -> None:
        assert self._columns is not None
        limits = self._limits
        self._rows_seen += 1
        if self._rows_seen > limits.max_rows:
            self._add(row, "", f"too many rows: the limit is {limits.max_rows}", limit="max_rows")
            self._stop()
            return
        problems_before = self._problem_count
        serial, name, url_cell = (_cell(cells, index) for index in self._columns)
        self._check_text(row, serial, name)
        urls = tuple(url for url in (piece.strip() for piece in url_cell.split(",")) if url)
        self._check_urls(row, urls)
        if self._stopped:
            return
        self._count_urls(row, len(urls))
        if self._problem_count == problems_before:
            out.append(ProductRow(row, serial, name, urls))

    def _check_text(self, row: int, serial: str, name: str) -> None:
        if not serial:
            self._add(row, _SERIAL, "empty serial number")
        if not name:
            self._add(row, _NAME, "empty product name")
        # Postgres text cannot hold NUL; everything else a spreadsheet cell may hold is fine.
        for column, value in ((_SERIAL, serial), (_NAME, name)):
            if "\x00" in value:
                self._add(row, column, "contains a NUL character")

    def _check_urls(self, row: int, urls: tuple[str, ...]) -> None:
        """One row's URL cell: present, not too many, each one well-formed (until a stop)."""
        limit = self._limits.max_urls_per_row
        if not urls:
            self._add(row, _URLS, "no image URLs")
        elif len(urls) > limit:
            message = f"too many image URLs: {len(urls)}, the limit is {limit}"
            self._add(row, _URLS, message, limit="max_urls_per_row")
        for url in urls:
            if self._stopped:
                return
            problem = _url_problem(url, self._limits.max_url_length)
            if problem is not None:
                self._add(row, _URLS, problem)

    def _count_urls(self, row: int, count: int) -> None:
        """The file's running URL count; past the limit the whole read stops."""
        self._urls_seen += count
        limit = self._limits.max_urls_total
        if self._urls_seen > limit and not self._stopped:
            message = f"too many image URLs in the file: the limit is {limit}"
            self._add(row, "", message, limit="max_urls_total")
            self._stop()

    def _add(self, row: int, column: str, message: str, limit: str = "") -> None:
        if limit and self._exceeded is None:
            self._exceeded = limit
        self._problem_count += 1
        if len(self._problems) < self._limits.max_problems:
            self._problems.append(CsvProblem(row, column, message))
        else:
            self._stop()  # the caller only shows the first max_problems anyway

    def _stop(self) -> None:
        self._stopped = True
        # Nothing more will be parsed or checked: release what the reader holds.
        self._pieces.clear()


def _header_key(name: str) -> str:
    return "".join(name.split()).lower()


def _cell(cells: list[str], index: int) -> str:
    # A short row leaves its missing cells empty.
    return cells[index].strip() if index < len(cells) else ""


def duplicate_serial(row: int, serial: str, first_row: int) -> CsvProblem:
    """The problem of a row whose serial number (compared stripped) an earlier row has."""
    message = f"duplicate serial number {_show(serial)} (first seen in row {first_row})"
    return CsvProblem(row, _SERIAL, message)


def _show(text: str) -> str:
    """Quote user data for a message, clipped so one huge cell cannot bloat the report."""
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return repr(text)


def _csv_error_text(exc: csv.Error) -> str:
    text = str(exc)
    if text == "unexpected end of data":
        return "unterminated quoted cell at the end of the file"
    if text.startswith("new-line character seen in unquoted field"):
        # Records are split at newlines outside quotes, so this means a lone CR, or a stray
        # quote (an inch mark, say) that made the record swallow the lines after it.
        return "line break or stray quote in an unquoted cell (quote the cell, doubling its quotes)"
    return text


def _url_problem(url: str, max_length: int) -> str | None:
    if len(url) > max_length:
        return f"image URL {_show(url)} is longer than {max_length} characters"
    if _BAD_URL_CHAR.search(url):
        return f"image URL {_show(url)} contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return f"image URL {_show(url)} cannot be parsed"
    # urlsplit lowercases the scheme, so "HTTPS://" passes.
    if parts.scheme not in ("http", "https"):
        return f"image URL {_show(url)} is not an absolute http(s) URL"
    if not host:
        return f"image URL {_show(url)} has no host"
    return None


def neutralise(cell: str) -> str:
    """Make a cell safe to open in a spreadsheet: a cell starting with = + - @ TAB or CR gets a
    leading apostrophe (OWASP CSV injection guidance). Other cells are returned unchanged."""
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


class OutputCsvWriter:
    """Writes OUTPUT_COLUMNS rows to a binary file object: UTF-8 without BOM, CRLF line
    endings, minimal RFC 4180 quoting, every cell neutralised. The header is written at once."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        # csv.writer needs text; render each row into a reused buffer and write its bytes.
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer)
        self._write_row(OUTPUT_COLUMNS)

    def write_product(
        self,
        serial_number: str,
        product_name: str,
        input_urls: Sequence[str],
        output_urls: Sequence[str | None],
        errors: Sequence[tuple[str, str]],
        ssims: Sequence[float | None] = (),
        notes: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write one product row.

        `output_urls[i]` is the result of `input_urls[i]`, None for a failed image, which leaves
        an empty slot ("a,,c"). `errors` are (url, code) pairs and `notes` the done images'
        outcome notes (url, NOTE), written together as "url: CODE; url: NOTE". `ssims[i]` is
        the SSIM of output i, written with four decimals in slots like the URLs' ("0.9812,,1");
        missing ones (failed images, rows stored before SSIM existed) leave the slot empty.
        Raises ValueError when a per-image list differs in length from the input URLs.
        """
        if len(output_urls) != len(input_urls):
            raise ValueError(f"{len(output_urls)} output URLs for {len(input_urls)} input URLs")
        if ssims and len(ssims) != len(input_urls):
            raise ValueError(f"{len(ssims)} SSIM values for {len(input_urls)} input URLs")
        outcomes = [*errors, *notes]
        self._write_row(
            (
                serial_number,
                product_name,
                ",".join(input_urls),
                ",".join(url or "" for url in output_urls),
                "; ".join(f"{url}: {code}" for url, code in outcomes),
                ",".join("" if s is None else f"{s:.4f}" for s in ssims),
            )
        )

    def _write_row(self, cells: Iterable[str]) -> None:
        self._writer.writerow([neutralise(cell) for cell in cells])
        self._out.write(self._buffer.getvalue().encode("utf-8"))
        self._buffer.seek(0)
        self._buffer.truncate()
