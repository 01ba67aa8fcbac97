"""Webhook delivery (Standard Webhooks). Being written; see WebhookDispatcher."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from services.common.config import WebhookSettings
from services.common.db import queries
from services.common.errors import Unavailable
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.streams import StreamNames


class WebhookDispatcher:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: StreamNames,
        session: aiohttp.ClientSession,
        settings: WebhookSettings,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.session = session
        self.settings = settings

    async def run_events(self, stop: asyncio.Event) -> None:
        await stop.wait()  # not delivering yet

    async def run_deliveries(self, stop: asyncio.Event) -> None:
        await stop.wait()  # not delivering yet

    async def list_deliveries(self, request_id: uuid.UUID) -> list[status_pb.WebhookDelivery]:
        raise Unavailable("webhook delivery is not available yet")

    async def redeliver(self, request: queries.RequestRow) -> status_pb.WebhookDelivery:
        raise Unavailable("webhook delivery is not available yet")
