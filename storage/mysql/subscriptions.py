"""Subscriptions through the operator's three subscription templates."""

from __future__ import annotations

from storage.model import Subscription
from storage.mysql.checks import check_subscription
from storage.mysql.columns import text
from storage.mysql.connection import Connections
from storage.mysql.schema import Schema
from storage.mysql.sql_template import subscription_values
from storage.mysql.templates import Templates


class Subscriptions:
    def __init__(self, connections: Connections, templates: Templates) -> None:
        self._db = connections
        self._t = templates

    async def save(self, schema: Schema, clientid: str, topic: str, qos: int) -> None:
        # A value the table cannot hold (e.g. a 100-character clientid in the plugin's
        # varchar(64)) is WriteRejected: the hook logic logs it once and still replays.
        check_subscription(clientid, topic, qos, schema.subscription_fills)
        tmpl = self._t.insert_subscription
        await self._db.query(tmpl.sql, tmpl.args(subscription_values(clientid, topic, qos)))

    async def delete(self, clientid: str, topic: str) -> None:
        tmpl = self._t.delete_subscription
        await self._db.query(tmpl.sql, tmpl.args(subscription_values(clientid, topic)))

    async def of(self, clientid: str) -> list[Subscription]:
        tmpl = self._t.select_subscriptions
        rows = await self._db.query(tmpl.sql, tmpl.args(subscription_values(clientid)), dict_rows=True)
        return [
            Subscription(text(row["topic"]), int(row["qos"]))
            for row in rows
            if row.get("topic") is not None and row.get("qos") is not None  # the plugin skips incomplete ones too
        ]
