"""The output CSV as it is kept in the object store: rendered from Postgres when a request
becomes final (finished by a worker, or cancelled by its owner), and again when a result that
was in flight at the cancel arrives."""

from __future__ import annotations

import io
import uuid

import asyncpg

from services.common.csv_format import OutputCsvWriter
from services.common.db import lifecycle, queries
from services.common.storage import Storage, output_csv_key


async def store_output_csv(pool: asyncpg.Pool, storage: Storage, request_id: uuid.UUID) -> bool:
    """Render a final request's output CSV and store it, holding the request's output-CSV lock
    (services/common/db/lifecycle.py `lock_output_csv`), so two writers can never leave the one
    rendered first stored last. False (nothing stored) when the request is gone or a delete of
    it has started."""
    async with pool.acquire() as conn, conn.transaction():
        if not await lifecycle.lock_output_csv(conn, request_id):
            return False
        csv = await render_output_csv(conn, storage, request_id)
        await storage.put(output_csv_key(request_id), csv, "text/csv")
    return True


async def render_output_csv(
    conn: queries.Connection, storage: Storage, request_id: uuid.UUID
) -> bytes:
    """The request's output CSV, every product in CSV order."""
    out = io.BytesIO()
    writer = OutputCsvWriter(out)
    async for product in queries.iter_products(conn, request_id):
        writer.write_product(
            product.serial_number,
            product.product_name,
            [image.input_url for image in product.images],
            # Never signed URLs, which would expire in the stored file: in presigned mode the
            # gateway renders the CSV again when it is downloaded.
            [
                storage.permanent_url(image.output_key) if image.output_key else None
                for image in product.images
            ],
            [
                (image.input_url, image.error_code or "")
                for image in product.images
                if image.status == "Failed"
            ],
            [image.ssim if image.status == "Done" else None for image in product.images],
            [(image.input_url, image.note) for image in product.images if image.note],
        )
    return out.getvalue()
