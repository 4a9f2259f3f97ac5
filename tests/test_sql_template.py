"""storage/mysql/sql_template.py: ${var} templates -> %s parameters (no database needed)."""

from __future__ import annotations

import json

import pymysql.converters
import pytest

from exhook.config import DEFAULT_SQL, ConfigError, load_config_string
from storage.model import StoredMessage
from storage.mysql.sql_template import (
    SqlTemplateError,
    compile_template,
    first_table,
    message_values,
    parse_delete_by_id,
    parse_insert,
    parse_plain_insert,
    subscription_values,
)


def render(sql: str, args: tuple[object, ...]) -> str:
    """What PyMySQL sends: %-formatting with escaped values."""
    return sql % tuple(pymysql.converters.escape_item(a, "utf8mb4") for a in args)


def test_default_insert_compiles_to_bound_parameters() -> None:
    t = compile_template("insert_message_sql", DEFAULT_SQL["insert_message_sql"])
    assert t.params == ("id", "from", "topic", "qos", "flags.retain", "payload", "timestamp")
    assert t.sql == (
        "insert into mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
        "values(%s, %s, %s, %s, %s, %s, FROM_UNIXTIME(%s/1000))"
    )
    assert t.prepare_sql.endswith("values(?, ?, ?, ?, ?, ?, FROM_UNIXTIME(?/1000))")
    assert "${" not in t.sql


def test_every_default_template_compiles() -> None:
    expected = {
        "delete_message_sql": ("id",),
        "select_message_sql": ("topic",),
        "insert_subscription_sql": ("clientid", "topic", "qos", "qos"),
        "select_subscriptions_sql": ("clientid",),
        "delete_subscription_sql": ("clientid", "topic"),
        "rekey_message_sql": ("new_id", "id"),
    }
    for name, params in expected.items():
        assert compile_template(name, DEFAULT_SQL[name]).params == params


def test_values_are_never_formatted_into_the_sql() -> None:
    t = compile_template("x", "select * from mqtt_msg where topic = ${topic}")
    evil = "t'; DROP TABLE mqtt_msg; --"
    args = t.args({"topic": evil})
    assert args == (evil,)
    assert render(t.sql, args) == "select * from mqtt_msg where topic = 't\\'; DROP TABLE mqtt_msg; --'"


def test_double_quoted_placeholders_are_stripped_like_the_plugin() -> None:
    t = compile_template("x", 'delete from mqtt_msg where msgid = "${id}" and topic = ${topic}')
    assert t.sql == "delete from mqtt_msg where msgid = %s and topic = %s"
    assert t.params == ("id", "topic")


def test_literal_percent_survives_pymysql_formatting() -> None:
    t = compile_template("x", "select * from m where note like '100%' and topic = ${topic} and a % 2 = 0")
    assert t.sql == "select * from m where note like '100%%' and topic = %s and a %% 2 = 0"
    assert render(t.sql, t.args({"topic": "a%b"})) == (
        "select * from m where note like '100%' and topic = 'a%b' and a % 2 = 0"
    )
    # no placeholder at all: executed with an empty args tuple, % still comes out single
    plain = compile_template("x", "select '%' from dual")
    assert render(plain.sql, plain.args({})) == "select '%' from dual"


def test_unknown_placeholder_is_an_error_naming_it() -> None:
    with pytest.raises(SqlTemplateError, match=r"mysql.select_message_sql: unknown placeholder \$\{foo\}"):
        compile_template("mysql.select_message_sql", "select * from mqtt_msg where topic = ${foo}")
    with pytest.raises(SqlTemplateError, match=r"unknown placeholder \$\{ id \}"):
        compile_template("x", "delete from mqtt_msg where msgid = ${ id }")
    # the config check agrees with the compiler
    with pytest.raises(ConfigError, match=r"\$\{foo\}"):
        mysql_config(select_message_sql="select ${foo}")


def mysql_config(**sql: str) -> None:
    fields = "\n".join(f"{name} = {json.dumps(text)}" for name, text in sql.items())
    load_config_string(f'mysql {{\nenable = true, topics = ["t/#"]\n{fields}\n}}')


@pytest.mark.parametrize("sql", [
    "select topic, qos from mqtt_sub where clientid = '${clientid}'",
    'select topic, qos from mqtt_sub where clientid = "x${clientid}"',
    "select topic, qos from mqtt_sub where clientid = concat('a', '${clientid}')",
    "select topic, qos from `${clientid}`",
    "select topic, qos from mqtt_sub where clientid = 'it''s ${clientid}'",
    "select topic, qos from mqtt_sub where clientid = 'a\\'${clientid}'",
    # a quote inside a comment opens no literal: the placeholder after it is still quoted
    "/* it's */ select topic, qos from mqtt_sub where clientid = '${clientid}'",
    "select topic, qos from mqtt_sub -- it's\n where clientid = '${clientid}'",
    "select topic, qos from mqtt_sub # it's\n where clientid = '${clientid}'",
])
def test_placeholder_inside_a_quoted_literal_is_refused(sql: str) -> None:
    # the driver quotes a value itself: '${clientid}' would become ''alice'', the value
    # outside any string literal (a clientid "' or 1=1 -- " would read every subscription)
    with pytest.raises(SqlTemplateError, match=r"mysql.select_subscriptions_sql: placeholder \$\{clientid\} inside "
                                               r"a quoted literal"):
        compile_template("mysql.select_subscriptions_sql", sql)
    with pytest.raises(ConfigError, match=r"mysql.select_subscriptions_sql: placeholder \$\{clientid\} inside"):
        mysql_config(select_subscriptions_sql=sql)


def test_comments_are_skipped_and_may_hold_no_placeholder() -> None:
    t = compile_template("x", "select * from t /* it's */ where a = ${topic} -- the topic's row\n")
    assert t.params == ("topic",)
    with pytest.raises(SqlTemplateError, match="x: a placeholder inside a comment"):
        compile_template("x", "select * from t /* ${clientid} */ where a = ${topic}")


def test_quotes_around_other_text_leave_placeholders_alone() -> None:
    t = compile_template("x", """select 'it''s', "a\\"b", `c``d` from t where a = "${topic}" and b = ${clientid}""")
    assert t.params == ("topic", "clientid")
    assert t.sql == """select 'it''s', "a\\"b", `c``d` from t where a = %s and b = %s"""


def test_config_check_refuses_what_the_store_would() -> None:
    # check-config says what start-up says: a placeholder a statement is not given,
    # a template that is only a ';'
    with pytest.raises(ConfigError, match=r"mysql.delete_message_sql: placeholder \$\{new_id\} is not available"):
        mysql_config(delete_message_sql="delete from mqtt_msg where msgid = ${new_id}")
    with pytest.raises(ConfigError, match=r"mysql.select_message_sql: empty SQL template"):
        mysql_config(select_message_sql=";")
    mysql_config(select_message_sql="select * from mqtt_msg where topic = ${topic};")


def test_placeholder_not_available_in_a_statement() -> None:
    t = compile_template("mysql.delete_message_sql", "delete from mqtt_msg where msgid = ${id} and x = ${payload}")
    with pytest.raises(SqlTemplateError, match=r"\$\{payload\} is not available"):
        t.require_only({"id", "topic"})
    t.require_only({"id", "topic", "payload"})
    with pytest.raises(SqlTemplateError, match=r"\$\{payload\} has no value"):
        t.args({"id": "x"})


def test_empty_template_and_trailing_semicolon() -> None:
    with pytest.raises(SqlTemplateError, match="empty"):
        compile_template("x", "  ;  ")
    assert compile_template("x", "select 1 ;; ").sql == "select 1"


def test_message_values_follow_the_plugin() -> None:
    msg = StoredMessage("0005F1B4C2D1E2F30A0B0C0D0E0F1011", "client-1", "t/1", 2, True, b"\x00\xff", 1700000000123)
    values = message_values(msg)
    assert values == {
        "id": "0005F1B4C2D1E2F30A0B0C0D0E0F1011",
        "from": "client-1",
        "clientid": "client-1",
        "topic": "t/1",
        "qos": 2,
        "flags.retain": 1,
        "retain": 1,
        "payload": b"\x00\xff",
        "timestamp": 1700000000123,
    }
    assert message_values(StoredMessage("A" * 32, "c", "t", 1, False, b"", 0))["retain"] == 0
    assert subscription_values("c", "t/#", 1) == {"clientid": "c", "topic": "t/#", "qos": 1}


def test_plain_insert_is_recognised_for_multi_row_batching() -> None:
    t = compile_template("insert_message_sql", DEFAULT_SQL["insert_message_sql"])
    shape = parse_plain_insert(t)
    assert shape is not None
    assert (shape.schema, shape.table) == (None, "mqtt_msg")
    assert shape.columns == ("msgid", "sender", "topic", "qos", "retain", "payload", "arrived")
    assert shape.direct["id"] == "msgid" and shape.direct["topic"] == "topic"
    assert shape.direct["payload"] == "payload" and shape.direct["from"] == "sender"
    assert shape.time_column == "arrived"
    assert shape.row.params == t.params
    assert shape.multi_row(2) == (
        "insert into mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) values "
        "(%s, %s, %s, %s, %s, %s, FROM_UNIXTIME(%s/1000)), (%s, %s, %s, %s, %s, %s, FROM_UNIXTIME(%s/1000))"
    )


def test_plain_insert_variants() -> None:
    t = compile_template(
        "x",
        'INSERT INTO `my db`.`off``line` (`message_id`, topic_name, body, note) '
        "VALUES (\"${id}\", ${topic}, ${payload}, 'a, (b)');",
    )
    shape = parse_plain_insert(t)
    assert shape is not None
    assert (shape.schema, shape.table) == ("my db", "off`line")
    assert shape.columns == ("message_id", "topic_name", "body", "note")
    assert shape.direct == {"id": "message_id", "topic": "topic_name", "payload": "body"}
    assert shape.time_column is None
    assert shape.row.sql == "(%s, %s, %s, 'a, (b)')"


@pytest.mark.parametrize(
    "sql",
    [
        "insert into t(a, b) values(${id}, ${topic}) on duplicate key update b = ${topic}",
        "insert into t(a, b) values(${id}, ${topic}), (${id}, ${topic})",
        "insert into t(a, b) select ${id}, ${topic}",
        "insert into t(a) values(${id}, ${topic})",
        "replace into t(a, b) values(${id}, ${topic})",
        "update t set a = ${id}",
    ],
)
def test_not_plain_inserts(sql: str) -> None:
    assert parse_plain_insert(compile_template("x", sql)) is None


def test_insert_with_a_tail_still_maps_columns() -> None:
    shape = parse_insert(compile_template("x", DEFAULT_SQL["insert_subscription_sql"]))
    assert shape is not None and shape.table == "mqtt_sub"
    assert shape.direct == {"clientid": "clientid", "topic": "topic", "qos": "qos"}
    assert shape.tail == "on duplicate key update qos = ${qos}"
    assert parse_insert(compile_template("x", "insert into t(a) select ${id}")) is None


def test_first_table() -> None:
    assert first_table(compile_template("x", "delete from mqtt_msg where msgid = ${id}")) == (None, "mqtt_msg")
    assert first_table(compile_template("x", "update db.t set a = ${id}")) == ("db", "t")
    assert first_table(compile_template("x", "insert into `a b`(x) select 1")) == (None, "a b")


def test_delete_by_id_shape() -> None:
    default = compile_template("x", DEFAULT_SQL["delete_message_sql"])
    assert parse_delete_by_id(default) == ("`mqtt_msg`", "`msgid`")
    assert parse_delete_by_id(compile_template("x", 'DELETE FROM db.`t` WHERE `m id` = "${id}";')) == (
        "`db`.`t`", "`m id`"
    )
    for other in ("delete from t where msgid = ${id} and topic = ${topic}", "delete from t where msgid > ${id}",
                  "delete from t where msgid = ${topic}", "update t set a = 1 where msgid = ${id}"):
        assert parse_delete_by_id(compile_template("x", other)) is None
