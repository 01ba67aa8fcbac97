"""The output CSV as it is kept in the object store: rendered from Postgres when a request
becomes final (finished by a worker, or cancelled by its owner)."""

from __future__ import annotations

import io
import uuid

from services.common.csv_format import OutputCsvWriter
from services.common.db import queries
from services.common.storage import Storage


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
