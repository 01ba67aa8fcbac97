"""The object-store interface, over obstore: `file://DIR` by default, `s3://BUCKET` at scale.

Keys are deterministic (`requests/<request id>/<image id>.jpg`), so a task delivered twice
overwrites its own output with the same bytes instead of leaving two outputs.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import obstore
from obstore.store import LocalStore, from_url


def image_key(request_id: uuid.UUID | str, image_id: int, extension: str) -> str:
    return f"requests/{request_id}/images/{image_id}.{extension}"


def output_csv_key(request_id: uuid.UUID | str) -> str:
    return f"requests/{request_id}/output.csv"


@dataclass(frozen=True, slots=True)
class Storage:
    url: str
    public_base_url: str
    store: obstore.store.ObjectStore

    @classmethod
    def from_url(cls, url: str, public_base_url: str = "") -> Storage:
        if url.startswith("file://"):
            # obstore wants the directory to exist (mkdir=True) and an absolute path.
            root = Path(unquote(urlsplit(url).path)).resolve()
            store: obstore.store.ObjectStore = LocalStore(root, mkdir=True)
        else:
            store = from_url(url)
        return cls(url=url, public_base_url=public_base_url, store=store)

    @property
    def local_root(self) -> Path | None:
        """The directory of a file:// store (the gateway serves it under /files/)."""
        if isinstance(self.store, LocalStore):
            return Path(unquote(urlsplit(self.url).path)).resolve()
        return None

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        if isinstance(self.store, LocalStore):
            # LocalStore cannot keep attributes; the gateway derives the type from the name.
            await obstore.put_async(self.store, key, data)
        else:
            await obstore.put_async(
                self.store, key, data, attributes={"Content-Type": content_type}
            )

    async def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        result = await obstore.get_async(self.store, key)
        return bytes(await result.bytes_async())

    async def probe(self) -> None:
        """Raise if the store cannot be reached (a missing probe object is fine)."""
        with contextlib.suppress(FileNotFoundError):
            await obstore.head_async(self.store, ".imgpipe-probe")

    def public_url(self, key: str) -> str:
        return self.public_base_url.rstrip("/") + "/" + quote(key)
