"""services.common.csv_format: the streaming input reader and the output writer."""

from __future__ import annotations

import csv
import io
import random
import tracemalloc
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from services.common.csv_format import (
    OUTPUT_COLUMNS,
    REQUIRED_COLUMNS,
    CsvLimits,
    CsvProblem,
    CsvReader,
    OutputCsvWriter,
    ProductRow,
    duplicate_serial,
    neutralise,
)

pytestmark = pytest.mark.unit

HEADER = "S. No.,Product Name,Input Image Urls\n"
SERIAL, NAME, URLS = REQUIRED_COLUMNS
Problem = tuple[int, str, str]
DEFAULT_LIMITS = CsvLimits()


def read(
    data: bytes | str,
    limits: CsvLimits = DEFAULT_LIMITS,
    chunks: Iterable[bytes] | None = None,
) -> tuple[list[ProductRow], CsvReader]:
    """Feed `data` whole (or the given chunks), finish, return every row handed out."""
    raw = data.encode() if isinstance(data, str) else data
    reader = CsvReader(limits)
    rows: list[ProductRow] = []
    for chunk in [raw] if chunks is None else chunks:
        rows += reader.feed(chunk)
    rows += reader.finish()
    return rows, reader


def problems_of(data: bytes | str, limits: CsvLimits = DEFAULT_LIMITS) -> list[Problem]:
    _, reader = read(data, limits)
    return [(p.row, p.column, p.message) for p in reader.problems]


def outcome(data: bytes, chunks: Iterable[bytes] | None = None) -> tuple[object, ...]:
    """Everything observable after a run, to compare runs fed in different chunkings."""
    rows, reader = read(data, chunks=chunks)
    return (
        rows,
        reader.problems,
        reader.truncated,
        reader.rows_seen,
        reader.urls_seen,
        reader.bytes_seen,
    )


def split_randomly(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    chunks, position = [], 0
    while position < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[position : position + size])
        position += size
    return chunks


# --- happy path and formats -------------------------------------------------------------------


def test_reads_valid_rows_with_stripped_cells_and_counters() -> None:
    data = (
        HEADER
        + "1, Blue shirt ,https://img.example.com/a.jpg\n"
        + ' 2 ,Pants,"http://img.example.com/b.png , https://cdn.example.org/c.webp?x=1"\n'
    )
    rows, reader = read(data)

    assert rows == [
        ProductRow(2, "1", "Blue shirt", ("https://img.example.com/a.jpg",)),
        ProductRow(
            3,
            "2",
            "Pants",
            ("http://img.example.com/b.png", "https://cdn.example.org/c.webp?x=1"),
        ),
    ]
    assert reader.ok
    assert reader.problems == []
    assert not reader.truncated
    assert (reader.rows_seen, reader.urls_seen, reader.bytes_seen) == (2, 3, len(data.encode()))


def test_rows_are_returned_by_the_feed_that_completes_them() -> None:
    reader = CsvReader()
    assert reader.feed(HEADER.encode()) == []
    assert reader.feed(b"1,Shirt,https://a.example/x.jpg") == []  # no newline yet
    assert [row.serial_number for row in reader.feed(b"\n2,Hat,https://a.example/y.jpg")] == ["1"]
    assert [row.serial_number for row in reader.finish()] == ["2"]


def test_leading_bom_is_stripped_once() -> None:
    # A BOM later in the file is data: it stays in the product name.
    rows, reader = read(b"\xef\xbb\xbf" + (HEADER + "1,\ufeffShirt,https://a.example/x\n").encode())
    assert reader.ok
    assert rows[0].product_name == "\ufeffShirt"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_lf_and_crlf_line_endings(newline: str) -> None:
    data = newline.join(
        [HEADER.strip(), "1,Shirt,https://a.example/x", "2,Hat,https://a.example/y", ""]
    )
    rows, reader = read(data)
    assert reader.ok
    assert [(r.row_number, r.serial_number, r.image_urls) for r in rows] == [
        (2, "1", ("https://a.example/x",)),
        (3, "2", ("https://a.example/y",)),
    ]


def test_mixed_line_endings_and_missing_final_newline() -> None:
    rows, reader = read(HEADER + "1,Shirt,https://a.example/x\r\n2,Hat,https://a.example/y")
    assert reader.ok
    assert [(r.row_number, r.product_name) for r in rows] == [(2, "Shirt"), (3, "Hat")]


def test_quoted_cell_with_newlines_commas_and_doubled_quotes_is_one_row() -> None:
    data = (
        HEADER
        + '1,"The ""best"" shirt,\r\nnow with\nnewlines","https://a.example/x,\nhttps://a.example/y"\r\n'
        + "2,Hat,https://a.example/z\r\n"
    )
    rows, reader = read(data)
    assert reader.ok
    assert rows[0] == ProductRow(
        2,
        "1",
        'The "best" shirt,\r\nnow with\nnewlines',
        ("https://a.example/x", "https://a.example/y"),
    )
    # Row numbers count records, not physical lines.
    assert rows[1].row_number == 3


def test_blank_lines_are_skipped_but_counted() -> None:
    data = HEADER + "\n1,Shirt,https://a.example/x\r\n\r\n , ,\n,,\n2,Hat,https://a.example/y\n\n"
    rows, reader = read(data)
    assert reader.ok
    assert [r.row_number for r in rows] == [3, 7]
    assert reader.rows_seen == 2


def test_wide_url_cell_within_limits_is_accepted() -> None:
    # 100 URLs of 2048 characters: larger than csv's default field size limit.
    urls = [f"https://a.example/{i:03d}/" + "x" * 2026 for i in range(100)]
    assert all(len(url) == 2048 for url in urls)
    rows, reader = read(HEADER + f'1,Shirt,"{",".join(urls)}"\n')
    assert reader.problems == []
    assert rows[0].image_urls == tuple(urls)


def test_urls_trailing_comma_and_empty_pieces_are_dropped_and_scheme_is_case_insensitive() -> None:
    rows, reader = read(HEADER + '1,Shirt,"HTTPS://A.example/x,, ,Http://b.example/y,"\n')
    assert reader.ok
    assert rows[0].image_urls == ("HTTPS://A.example/x", "Http://b.example/y")


def test_large_multiline_cell_across_many_small_chunks() -> None:
    name = "line of text\n" * 9_000  # about 117 KB inside one quoted cell
    data = (HEADER + f'1,"{name}",https://a.example/x\n2,Hat,https://a.example/y\n').encode()
    chunks = [data[i : i + 64] for i in range(0, len(data), 64)]
    rows, reader = read(data, chunks=chunks)
    assert reader.ok
    assert rows[0].product_name == name.strip()
    assert rows[1].row_number == 3


def test_oversized_cell_is_a_problem_not_a_crash() -> None:
    name = "x" * (2 * 1024 * 1024)
    problems = problems_of(HEADER + f"1,{name},https://a.example/x\n2,,https://a.example/y\n")
    assert [(row, column) for row, column, _ in problems] == [(2, ""), (3, NAME)]
    assert problems[0][2].startswith("malformed CSV: field larger than field limit")


# --- header -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "s. no.,product name,input image urls",
        "S.No.,ProductName,InputImageUrls",
        " S. No. , Product  Name ,INPUT IMAGE URLS ",
        "S.\tNo.,Product\u00a0Name,Input Image Urls",
        '"S. No.","Product Name","Input Image Urls"',
    ],
)
def test_header_names_match_ignoring_case_and_whitespace(header: str) -> None:
    rows, reader = read(f"{header}\n1,Shirt,https://a.example/x\n")
    assert reader.ok
    assert rows == [ProductRow(2, "1", "Shirt", ("https://a.example/x",))]


def test_header_columns_in_any_order_with_extra_columns() -> None:
    data = (
        "Notes,Input Image Urls,,Colour,Product Name,S. No.\nhi,https://a.example/x,,red,Shirt,9\n"
    )
    rows, reader = read(data)
    assert reader.ok
    assert rows == [ProductRow(2, "9", "Shirt", ("https://a.example/x",))]


def test_missing_header_columns_one_problem_each_and_rows_not_validated() -> None:
    data = "S. No.,Name,Urls\n,,\n1,,\n1,,ftp://x\n"
    assert problems_of(data) == [
        (1, NAME, "missing required column"),
        (1, URLS, "missing required column"),
    ]


def test_duplicate_header_column_is_a_problem() -> None:
    data = HEADER.strip() + ",s.no.\n1,Shirt,https://a.example/x,2\n"
    rows, reader = read(data)
    assert rows == []
    assert [(p.row, p.column, p.message) for p in reader.problems] == [
        (1, SERIAL, "duplicate column (columns 1 and 4)"),
    ]


def test_header_after_blank_lines_keeps_physical_row_numbers() -> None:
    rows, reader = read("\n" + HEADER + "1,Shirt,https://a.example/x\n")
    assert reader.ok
    assert rows[0].row_number == 3
    assert problems_of("\r\nS. No.,Product Name\n") == [(2, URLS, "missing required column")]


# --- per-row rejections -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (",Shirt,https://a.example/x", [(2, SERIAL, "empty serial number")]),
        ("   ,Shirt,https://a.example/x", [(2, SERIAL, "empty serial number")]),
        ("1,,https://a.example/x", [(2, NAME, "empty product name")]),
        ("1, \t ,https://a.example/x", [(2, NAME, "empty product name")]),
        ("1,Shirt,", [(2, URLS, "no image URLs")]),
        ('1,Shirt," , ,,"', [(2, URLS, "no image URLs")]),
        ("1,Shirt", [(2, URLS, "no image URLs")]),  # short row: missing cells are empty
        ("1", [(2, NAME, "empty product name"), (2, URLS, "no image URLs")]),
        (
            ",,",  # all cells empty is a blank line, so this is a header-only file
            [(2, "", "no product rows")],
        ),
    ],
)
def test_row_rejections(line: str, expected: list[Problem]) -> None:
    rows, reader = read(HEADER + line + "\n")
    assert rows == []
    assert [(p.row, p.column, p.message) for p in reader.problems] == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://a.example/x.jpg", "is not an absolute http(s) URL"),
        ("javascript:alert(1)", "is not an absolute http(s) URL"),
        ("/images/x.jpg", "is not an absolute http(s) URL"),
        ("www.example.com/x.jpg", "is not an absolute http(s) URL"),
        ("file:///etc/passwd", "is not an absolute http(s) URL"),
        ("http:///x.jpg", "has no host"),
        ("https://user@/x.jpg", "has no host"),
        ("http:a.example/x.jpg", "has no host"),
        ("http://a.example/x y.jpg", "contains whitespace or control characters"),
        ("http://a.example/x\x01.jpg", "contains whitespace or control characters"),
        ("http://a.example/x\x85.jpg", "contains whitespace or control characters"),
        ("http://a.example/x\x7f.jpg", "contains whitespace or control characters"),
        ("http://[::1/x.jpg", "cannot be parsed"),
    ],
)
def test_invalid_urls_are_named(url: str, reason: str) -> None:
    data = HEADER + f'1,Shirt,"https://ok.example/a.jpg,{url}"\n'
    assert problems_of(data) == [(2, URLS, f"image URL {url!r} {reason}")]


def test_too_long_url_is_rejected_and_clipped_in_the_message() -> None:
    limits = CsvLimits(max_url_length=100)
    fits = "https://a.example/" + "x" * 82
    too_long = "https://a.example/" + "y" * 83
    problems = problems_of(HEADER + f'1,Shirt,"{fits},{too_long}"\n', limits)
    assert len(problems) == 1
    row, column, message = problems[0]
    assert (row, column) == (2, URLS)
    assert "longer than 100 characters" in message
    assert too_long[:60] in message
    assert too_long not in message
    assert len(message) < 130


def test_duplicate_serials_are_left_to_ingest_so_memory_stays_flat() -> None:
    # Uniqueness needs every row; ingest checks it in Postgres (tests/integration/test_ingest).
    data = (
        HEADER
        + "7,Shirt,https://a.example/x\n\n 7 ,Hat,https://a.example/y\n07,Cap,https://a.example/z\n"
    )
    rows, reader = read(data)
    assert reader.ok
    assert [(row.row_number, row.serial_number) for row in rows] == [(2, "7"), (4, "7"), (5, "07")]
    assert duplicate_serial(4, "7", 2) == CsvProblem(
        4, SERIAL, "duplicate serial number '7' (first seen in row 2)"
    )


def test_problems_keep_being_found_after_the_first_and_valid_rows_still_come() -> None:
    data = (
        HEADER
        + "1,Shirt,https://a.example/x\n"
        + ",Bad,https://a.example/x\n"
        + "2,Fine,https://a.example/y\n"
        + "3,,gopher://a.example\n"
    )
    rows, reader = read(data)
    assert [row.row_number for row in rows] == [2, 4]  # ingest checks their serial numbers
    assert not reader.ok
    assert [(p.row, p.column) for p in reader.problems] == [(3, SERIAL), (5, NAME), (5, URLS)]


# --- file-level problems ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"  \r\n\n\t\n", b"\xef\xbb\xbf\n,,\n"])
def test_empty_file(data: bytes) -> None:
    assert problems_of(data) == [(1, "", "the file is empty")]


@pytest.mark.parametrize("data", [HEADER, HEADER.strip(), HEADER + "\n\n"])
def test_header_without_product_rows(data: str) -> None:
    assert problems_of(data) == [(2, "", "no product rows")]


def test_unterminated_quote_at_end_of_file() -> None:
    data = HEADER + '1,Shirt,https://a.example/x\n2,"Hat,https://a.example/y\n3,Cap,x\n'
    assert problems_of(data) == [
        (3, "", "malformed CSV: unterminated quoted cell at the end of the file"),
    ]


def test_malformed_quoting_is_reported_and_reading_continues() -> None:
    data = HEADER + '1,"Shirt"x,https://a.example/x\n,Hat,https://a.example/y\n'
    assert problems_of(data) == [
        (2, "", "malformed CSV: ',' expected after '\"'"),
        (3, SERIAL, "empty serial number"),
    ]


def test_stray_quote_in_unquoted_cell_is_reported() -> None:
    data = HEADER + '1,Monitor 27" wide,https://a.example/x\n2,Hat,https://a.example/y\n'
    assert problems_of(data) == [
        (
            2,
            "",
            "malformed CSV: line break or stray quote in an unquoted cell"
            " (quote the cell, doubling its quotes)",
        ),
    ]


def test_nul_character_is_reported() -> None:
    data = HEADER + "1,Sh\x00irt,https://a.example/x\n\x002,Hat,https://a.example/y\n"
    assert problems_of(data) == [
        (2, NAME, "contains a NUL character"),
        (3, SERIAL, "contains a NUL character"),
    ]


def test_malformed_header_is_reported_once() -> None:
    data = 'S. No.,"Product" Name,Input Image Urls\n,,ftp://x\n'
    assert problems_of(data) == [(1, "", "malformed CSV: ',' expected after '\"'")]


def test_invalid_utf8_names_row_and_byte_offset_and_stops() -> None:
    head = (HEADER + "1,Shirt,https://a.example/x\n2,Caf").encode()
    data = head + b"\xe9,https://a.example/y\n,,ftp://x\n"
    rows, reader = read(data)
    assert [row.row_number for row in rows] == [2]
    assert [(p.row, p.column, p.message) for p in reader.problems] == [
        (3, "", f"not valid UTF-8 (byte offset {len(head)})"),
    ]


def test_invalid_utf8_offset_counts_the_bom_and_split_characters() -> None:
    head = b"\xef\xbb\xbf" + (HEADER + "1,\u4e2d\u6587,https://a.example/x\n").encode()
    data = head + b"\xf0\x9f\x98" + b"x\n"  # a 4-byte sequence cut short
    expected = [(3, "", f"not valid UTF-8 (byte offset {len(head)})")]
    for chunks in (
        [data],
        [bytes([b]) for b in data],
        [data[: len(head) + 2], data[len(head) + 2 :]],
    ):
        _, reader = read(data, chunks=chunks)
        assert [(p.row, p.column, p.message) for p in reader.problems] == expected


def test_truncated_utf8_at_end_of_file() -> None:
    data = (HEADER + "1,Shirt,https://a.example/x\n2,Caf").encode() + b"\xc3"
    assert problems_of(data) == [(3, "", f"not valid UTF-8 (byte offset {len(data) - 1})")]


# --- limits -------------------------------------------------------------------------------------


def product_lines(count: int, urls_per_row: int = 1) -> str:
    return "".join(
        f'{i},Product {i},"{",".join(f"https://a.example/{i}/{j}" for j in range(urls_per_row))}"\n'
        for i in range(1, count + 1)
    )


def test_row_limit_reports_first_row_over_and_stops() -> None:
    data = HEADER + "\n" + product_lines(3) + "99,,\n" + ",,ftp://x\n"
    rows, reader = read(data, CsvLimits(max_rows=3))
    assert [row.row_number for row in rows] == [3, 4, 5]  # blank row 2 does not count
    assert [(p.row, p.column, p.message) for p in reader.problems] == [
        (6, "", "too many rows: the limit is 3"),
    ]


def test_row_limit_exactly_reached_is_fine() -> None:
    rows, reader = read(HEADER + product_lines(3), CsvLimits(max_rows=3))
    assert reader.ok
    assert len(rows) == 3


def test_urls_per_row_limit() -> None:
    data = HEADER + product_lines(2, urls_per_row=3)
    assert problems_of(data, CsvLimits(max_urls_per_row=3)) == []
    assert problems_of(data, CsvLimits(max_urls_per_row=2)) == [
        (2, URLS, "too many image URLs: 3, the limit is 2"),
        (3, URLS, "too many image URLs: 3, the limit is 2"),
    ]


def test_total_urls_limit_reports_first_row_over_and_stops() -> None:
    data = HEADER + product_lines(4, urls_per_row=2) + ",,\n"
    rows, reader = read(data, CsvLimits(max_urls_total=5))
    assert [row.row_number for row in rows] == [2, 3]
    assert [(p.row, p.column, p.message) for p in reader.problems] == [
        (4, "", "too many image URLs in the file: the limit is 5"),
    ]
    assert reader.urls_seen == 6


def test_byte_limit_counts_fed_bytes_and_names_the_row_it_is_crossed_in() -> None:
    data = (HEADER + product_lines(5)).encode()
    third_row_start = len((HEADER + product_lines(2)).encode())
    limits = CsvLimits(max_bytes=third_row_start + 3)
    expected = [(4, "", f"file too large: the limit is {third_row_start + 3} bytes")]
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        rows, reader = read(data, limits, chunks)
        assert [(p.row, p.column, p.message) for p in reader.problems] == expected
        assert [row.row_number for row in rows] == [2, 3]
        assert reader.bytes_seen == len(data)


def test_byte_limit_exactly_reached_is_fine() -> None:
    data = (HEADER + product_lines(5)).encode()
    _, reader = read(data, CsvLimits(max_bytes=len(data)))
    assert reader.ok


def test_problem_cap_sets_truncated() -> None:
    data = HEADER + "".join(f"{i},,https://a.example/x\n" for i in range(20))
    _, reader = read(data, CsvLimits(max_problems=5))
    assert [p.row for p in reader.problems] == [2, 3, 4, 5, 6]
    assert reader.truncated
    assert not reader.ok


def test_exactly_max_problems_is_not_truncated() -> None:
    data = HEADER + "".join(f"{i},,https://a.example/x\n" for i in range(5))
    _, reader = read(data, CsvLimits(max_problems=5))
    assert len(reader.problems) == 5
    assert not reader.truncated


def test_default_problem_cap_is_100() -> None:
    data = HEADER + "".join(f"{i},,\n" for i in range(80))  # two problems per row
    _, reader = read(data)
    assert len(reader.problems) == 100
    assert reader.truncated


def test_feed_after_finish_is_an_error_and_finish_is_idempotent() -> None:
    reader = CsvReader()
    reader.feed(HEADER.encode())
    assert reader.finish() == []
    assert reader.finish() == []
    assert reader.problems == [CsvProblem(2, "", "no product rows")]
    with pytest.raises(RuntimeError):
        reader.feed(b"1,Shirt,https://a.example/x\n")


# --- chunking invariance ------------------------------------------------------------------------

VALID_SAMPLE = (
    "\ufeff"
    + "Notes, s.no. ,Product Name,Input Image Urls\r\n"
    + 'caf\u00e9,1,"Shirt \u4e2d\u6587 \U0001f455, ""quoted""\r\nsecond line",'
    + '"https://a.example/\u00e9.jpg,\nhttps://b.example/2.jpg"\r\n'
    + "\r\n"
    + "x,2,Hat \u00fc,https://c.example/3.jpg\n"
    + '"",3,"multi\n\nline","https://d.example/4.jpg,"'
).encode()

INVALID_SAMPLE = (
    "\ufeffS. No.,Product Name,Input Image Urls\r\n"
    + "1,Shirt \u00e9,https://a.example/1.jpg\r\n"
    + ',"\u4e2d\n\u6587",https://a.example/2.jpg\r\n'
    + '1,Dup,"ftp://a.example/3.jpg, https://ok.example/4.jpg"\n'
    + "\n"
    + '4,"bad""quote"x,https://a.example/5.jpg\r\n'
    + "5,No urls, , ,\r\n"
    + '6,"\U0001f600",http://\r\n'
).encode()

DECODE_ERROR_SAMPLE = VALID_SAMPLE[:60] + b"\xff" + VALID_SAMPLE[60:]


@pytest.mark.parametrize(
    "data",
    [VALID_SAMPLE, INVALID_SAMPLE, DECODE_ERROR_SAMPLE],
    ids=["valid", "invalid", "bad-utf8"],
)
def test_same_outcome_whatever_the_chunking(data: bytes) -> None:
    expected = outcome(data)

    assert outcome(data, [data[i : i + 1] for i in range(len(data))]) == expected
    for seed in range(20):
        chunks = split_randomly(data, random.Random(seed), largest=17)
        assert outcome(data, chunks) == expected, f"seed {seed}"
    for cut in range(len(data) + 1):  # every split point: inside characters, CRLFs, quotes
        assert outcome(data, [data[:cut], b"", data[cut:]]) == expected, f"split at byte {cut}"


def test_chunking_samples_exercise_what_they_claim() -> None:
    rows, reader = read(VALID_SAMPLE)
    assert reader.ok
    assert [(r.row_number, r.serial_number) for r in rows] == [(2, "1"), (4, "2"), (5, "3")]
    assert rows[0].product_name == 'Shirt \u4e2d\u6587 \U0001f455, "quoted"\r\nsecond line'
    assert rows[0].image_urls == ("https://a.example/\u00e9.jpg", "https://b.example/2.jpg")

    assert problems_of(INVALID_SAMPLE) == [
        (3, SERIAL, "empty serial number"),
        (4, URLS, "image URL 'ftp://a.example/3.jpg' is not an absolute http(s) URL"),
        (6, "", "malformed CSV: ',' expected after '\"'"),
        (7, URLS, "no image URLs"),
        (8, URLS, "image URL 'http://' has no host"),
    ]
    assert problems_of(DECODE_ERROR_SAMPLE) == [(2, "", "not valid UTF-8 (byte offset 60)")]


# --- memory -------------------------------------------------------------------------------------


def generated_csv(rows: int, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
    """A valid CSV of about 4 KB per row, produced chunk by chunk, never whole."""
    padding = "\u00e9" * 1900
    parts, size = [HEADER.replace("\n", "\r\n")], 0
    for i in range(rows):
        line = (
            f'{i},Product {padding},"https://a.example/{i}/a.jpg, https://a.example/{i}/b.jpg"\r\n'
        )
        parts.append(line)
        size += len(line)
        if size >= chunk_size:
            yield "".join(parts).encode()
            parts, size = [], 0
    yield "".join(parts).encode()


def measure(rows: int) -> tuple[int, int, int]:
    """(bytes fed, peak traced memory, traced memory at the end) for reading `rows` rows."""
    limits = CsvLimits(max_bytes=10**12, max_rows=10**9, max_urls_total=10**9)
    tracemalloc.start()
    try:
        reader = CsvReader(limits)
        fed = 0
        for chunk in generated_csv(rows):
            fed += len(chunk)
            reader.feed(chunk)
        reader.finish()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.ok
    assert reader.rows_seen == rows
    return fed, peak, current


def test_memory_stays_flat_as_the_file_grows() -> None:
    small_fed, small_peak, _ = measure(5_000)
    big_fed, big_peak, big_end = measure(50_000)

    assert big_fed > 150 * 1024 * 1024
    # What is alive at the end is the serial-number set; the rest of the peak is the working
    # set (a chunk, a record), which must not depend on the file size.
    assert big_peak - big_end < 4 * 1024 * 1024
    # The serial set grows with the row count, but nowhere near the bytes fed.
    assert big_peak - small_peak < 0.1 * (big_fed - small_fed)


# --- output writer ------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", ["=", "+", "-", "@", "\t", "\r"])
def test_neutralise_prefixes_dangerous_leading_characters(lead: str) -> None:
    assert neutralise(lead + "SUM(A1:A9)") == "'" + lead + "SUM(A1:A9)"


@pytest.mark.parametrize("cell", ["", "Shirt", "a=b", " =1", "'=1", "https://a.example/x", "5"])
def test_neutralise_leaves_safe_cells_alone(cell: str) -> None:
    assert neutralise(cell) == cell


def write(*products: tuple[Any, ...]) -> bytes:
    out = io.BytesIO()
    writer = OutputCsvWriter(out)
    for product in products:
        writer.write_product(*product)
    return out.getvalue()


def test_writer_header_without_bom_and_crlf() -> None:
    assert write() == b"S. No.,Product Name,Input Image Urls,Output Image Urls,Errors,SSIM\r\n"
    assert tuple(next(csv.reader(io.StringIO(write().decode())))) == OUTPUT_COLUMNS


def test_writer_rows_with_empty_slots_and_errors() -> None:
    data = write(
        (
            "1",
            "Shirt, blue",
            ["https://a.example/1", "https://a.example/2", "https://a.example/3"],
            ["https://out.example/1.jpg", None, "https://out.example/3.jpg"],
            [("https://a.example/2", "FETCH_TIMEOUT")],
        ),
        ("2", "Hat", ["https://a.example/4"], ["https://out.example/4.jpg"], []),
        (
            "3",
            "Cap \u00e9",
            ["https://a.example/5", "https://a.example/6"],
            [None, None],
            [("https://a.example/5", "HTTP_404"), ("https://a.example/6", "NOT_AN_IMAGE")],
        ),
    )
    lines = data.split(b"\r\n")
    assert lines[1] == (
        b'1,"Shirt, blue","https://a.example/1,https://a.example/2,https://a.example/3",'
        b'"https://out.example/1.jpg,,https://out.example/3.jpg",'
        b"https://a.example/2: FETCH_TIMEOUT,"
    )
    assert list(csv.reader(io.StringIO(data.decode(), newline="")))[2:] == [
        ["2", "Hat", "https://a.example/4", "https://out.example/4.jpg", "", ""],
        [
            "3",
            "Cap \u00e9",
            "https://a.example/5,https://a.example/6",
            ",",
            "https://a.example/5: HTTP_404; https://a.example/6: NOT_AN_IMAGE",
            "",
        ],
    ]
    assert data.endswith(b"\r\n")


def test_writer_neutralises_every_cell() -> None:
    data = write(("-5", "=HYPERLINK(x)", ["@a"], ["+b"], [("\tc", "E")]))
    assert list(csv.reader(io.StringIO(data.decode(), newline="")))[1] == [
        "'-5",
        "'=HYPERLINK(x)",
        "'@a",
        "'+b",
        "'\tc: E",
        "",
    ]


def test_writer_adds_ssim_slots_and_notes_after_errors() -> None:
    data = write(
        (
            "1",
            "Shirt",
            ["https://a.example/1", "https://a.example/2", "https://a.example/3"],
            ["https://out.example/1.jpg", None, "https://out.example/3.jpg"],
            [("https://a.example/2", "HTTP_STATUS")],
            [0.981234, None, 1.0],
            [("https://a.example/3", "TARGET_NOT_MET")],
        ),
        ("2", "Hat", ["-1"], ["o"], [], [-0.25], []),
    )
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert rows[0][-2:] == ["Errors", "SSIM"]
    assert rows[1][4:] == [
        "https://a.example/2: HTTP_STATUS; https://a.example/3: TARGET_NOT_MET",
        "0.9812,,1.0000",
    ]
    assert rows[2][5] == "'-0.2500"  # a cell starting with "-" is neutralised, numbers too


def test_writer_rejects_mismatched_ssim_lists() -> None:
    with pytest.raises(ValueError, match="1 SSIM values for 2 input URLs"):
        write(("1", "Shirt", ["a", "b"], [None, None], [], [0.9], []))


def test_writer_rejects_mismatched_url_lists() -> None:
    with pytest.raises(ValueError, match="2 output URLs for 1 input URLs"):
        write(("1", "Shirt", ["https://a.example/1"], [None, None], []))


def test_writer_output_reads_back_with_the_reader() -> None:
    data = write(
        (
            "1",
            'Shirt "best"\nline two',
            ["https://a.example/1", "https://a.example/2"],
            [None, "y"],
            [],
        ),
        ("2", "Hat", ["https://a.example/3"], ["z"], []),
    )
    rows, reader = read(data)
    assert reader.ok
    assert rows == [
        ProductRow(
            2, "1", 'Shirt "best"\nline two', ("https://a.example/1", "https://a.example/2")
        ),
        ProductRow(3, "2", "Hat", ("https://a.example/3",)),
    ]
