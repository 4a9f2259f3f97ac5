"""The seven SQL templates of a ``mysql`` config block, compiled once, with the shapes
the store can use (multi-row batching, the column each placeholder fills)."""

from __future__ import annotations

from dataclasses import dataclass

from storage.base import StoreConfigError
from storage.config import MysqlConfig
from storage.mysql.sql_template import (
    PlainInsert,
    SqlTemplate,
    SqlTemplateError,
    compile_template,
    first_table,
    parse_delete_by_id,
    parse_insert,
    parse_plain_insert,
)

# Placeholders each statement can be given (the plugin renders the same maps).
AVAILABLE: dict[str, frozenset[str]] = {
    "insert_message_sql": frozenset(
        {"id", "from", "clientid", "topic", "qos", "flags.retain", "retain", "payload", "timestamp"}
    ),
    "delete_message_sql": frozenset({"id", "topic"}),
    "select_message_sql": frozenset({"topic"}),
    "insert_subscription_sql": frozenset({"clientid", "topic", "qos"}),
    "select_subscriptions_sql": frozenset({"clientid"}),
    "delete_subscription_sql": frozenset({"clientid", "topic"}),
    "rekey_message_sql": frozenset({"id", "new_id", "topic"}),
}


@dataclass(frozen=True, slots=True)
class Templates:
    insert_message: SqlTemplate
    delete_message: SqlTemplate
    select_message: SqlTemplate
    insert_subscription: SqlTemplate
    select_subscriptions: SqlTemplate
    delete_subscription: SqlTemplate
    rekey_message: SqlTemplate
    # insert_message_sql as a plain single-row insert (multi-row batching), if it is one
    plain_insert: PlainInsert | None
    # its table and which column each placeholder fills (also with a tail such as
    # "on duplicate key update"); None for other shapes ("insert ... set ...")
    insert_shape: PlainInsert | None
    subscription_shape: PlainInsert | None
    # delete_message_sql as "delete from <t> where <col> = ${id}": (table, column)
    delete_by_id: tuple[str, str] | None

    @staticmethod
    def compile(config: MysqlConfig) -> Templates:
        """Raise ``StoreConfigError`` naming a missing template or a placeholder it
        may not use."""
        try:
            t = {name: compile_template(f"mysql.{name}", sql) for name, sql in config.sql.items()}
            missing = [name for name in AVAILABLE if name not in t]
            if missing:
                raise SqlTemplateError(f"mysql.{missing[0]}: template missing")
            for name, available in AVAILABLE.items():
                t[name].require_only(available)
        except SqlTemplateError as exc:
            raise StoreConfigError(str(exc)) from None
        return Templates(
            t["insert_message_sql"], t["delete_message_sql"], t["select_message_sql"],
            t["insert_subscription_sql"], t["select_subscriptions_sql"], t["delete_subscription_sql"],
            t["rekey_message_sql"],
            plain_insert=parse_plain_insert(t["insert_message_sql"]),
            insert_shape=parse_insert(t["insert_message_sql"]),
            subscription_shape=parse_insert(t["insert_subscription_sql"]),
            delete_by_id=parse_delete_by_id(t["delete_message_sql"]),
        )

    @property
    def regroupable(self) -> bool:
        """May a batch be regrouped by kind (``storage.runs``)? Only when deletes and
        re-keys touch rows by message id alone (a template keyed by topic would let a
        delete moved after a save remove that save's row)."""
        return self.delete_by_id is not None and set(self.rekey_message.params) <= {"id", "new_id"}

    def all(self) -> tuple[SqlTemplate, ...]:
        return (self.insert_message, self.delete_message, self.select_message, self.insert_subscription,
                self.select_subscriptions, self.delete_subscription, self.rekey_message)

    def message_table(self) -> tuple[str | None, str]:
        """(schema or None, table) that insert_message_sql writes to."""
        if self.insert_shape is not None:
            return self.insert_shape.schema, self.insert_shape.table
        return first_table(self.insert_message) or (None, "mqtt_msg")

    def subscription_table(self) -> tuple[str | None, str]:
        if self.subscription_shape is not None:
            return self.subscription_shape.schema, self.subscription_shape.table
        return first_table(self.insert_subscription) or (None, "mqtt_sub")
