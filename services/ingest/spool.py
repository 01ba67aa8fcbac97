"""Receiving an upload before it is stored: parse and validate as it streams, keep it on disk.

Ingest takes a Postgres connection only once the whole upload has arrived (issue 14: stalled
uploads used to hold the pool). Until then, rows are validated by the streaming `CsvReader` as
they come and written, a batch at a time, to an anonymous temporary file. So memory holds one
batch, disk about the CSV's size (which `CsvLimits.max_bytes` bounds), and nothing in Postgres
waits on the client. `batches()` then gives the rows back, in order, for one short transaction.
"""

from __future__ import annotations

import hashlib
import pickle
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import IO

from services.common.csv_format import CsvLimits, CsvReader, ProductRow

# Rows per batch on disk and per INSERT: fewer round trips once the connection is taken, and
# still about a megabyte in memory.
BATCH = 2000


class Spool:
    """One upload's validated rows on disk, its reader (problems, limits) and its SHA-256.

    Use as a context manager: the file is anonymous (unlinked at once) and closed on exit.
    """

    def __init__(self, limits: CsvLimits) -> None:
        self.reader = CsvReader(limits)
        self._max_bytes = limits.max_bytes
        self.digest = hashlib.sha256()
        self.batches_written = 0
        # An anonymous file: nothing else can open it, and it vanishes with the process.
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="imgpipe-upload-")  # noqa: SIM115
        self._batch: list[ProductRow] = []

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    async def receive(self, chunks: AsyncIterator[bytes]) -> None:
        """Read the upload to its end, or until it is larger than `max_bytes`.

        A file already refused (too many problems, too many rows) is still read to its end, only
        counted, so that the answer never overtakes the client's writes: an asyncio gRPC client
        reports INTERNAL instead of an answer that arrives while it writes (grpc/grpc#36066).
        Past `max_bytes` reading stops: the gateway never sends that much (the same limit), and
        reading on would have no end.
        """
        reader = self.reader
        async for chunk in chunks:
            self.digest.update(chunk)
            self._add(reader.feed(chunk))
            if reader.bytes_seen > self._max_bytes:
                break
        self._add(reader.finish())
        self._flush()

    def batches(self) -> Iterator[list[ProductRow]]:
        """The rows kept, a batch at a time, in file order."""
        self._file.seek(0)
        for _ in range(self.batches_written):
            yield [ProductRow(*fields) for fields in pickle.load(self._file)]  # noqa: S301

    def _add(self, rows: list[ProductRow]) -> None:
        # Valid rows are kept even after a problem: the duplicate check in Postgres sees them
        # all and reports its findings with the reader's. Past a size limit nothing is kept.
        if self.reader.exceeded is not None:
            self._batch.clear()
            return
        self._batch.extend(rows)
        if len(self._batch) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch and self.reader.exceeded is None:
            # pickle: the fastest faithful encoding of plain tuples, and this file is only ever
            # read back by this process (it has no name another process could open).
            fields = [
                (p.row_number, p.serial_number, p.product_name, p.image_urls) for p in self._batch
            ]
            pickle.dump(fields, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self.batches_written += 1
        self._batch.clear()
