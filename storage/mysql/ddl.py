"""The DDL of the default schema (docs/mysql-schema.md explains every column)."""

from __future__ import annotations

# The plugin's DDL (emqx_offline_messages_mysql INIT_SQL) with two compatible
# changes, see docs/mysql-schema.md: payload is LONGBLOB (BLOB holds only 64 KiB,
# EMQX's default max_packet_size is 1 MB) and msgid is indexed (every ack and
# re-key looks a message up by msgid).
MESSAGE_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_msg` ("
    "`id` bigint unsigned NOT NULL AUTO_INCREMENT,"
    "`msgid` varchar(64) DEFAULT NULL,"
    "`topic` varchar(180) NOT NULL,"
    "`sender` varchar(64) DEFAULT NULL,"
    "`qos` tinyint(1) NOT NULL DEFAULT '0',"
    "`retain` tinyint(1) DEFAULT NULL,"
    "`payload` longblob,"
    "`arrived` datetime NOT NULL,"
    "PRIMARY KEY (`id`),"
    "INDEX topic_index(`topic`),"
    "INDEX msgid_index(`msgid`)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8MB4"
)
SUBSCRIPTION_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_sub` ("
    "`clientid` varchar(64) NOT NULL,"
    "`topic` varchar(180) NOT NULL,"
    "`qos` tinyint(1) NOT NULL DEFAULT '0',"
    "PRIMARY KEY (`clientid`, `topic`)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8MB4"
)
# This service's bookkeeping (the same three tables as the SQLite backend). Keys
# that can be long (connection ids, topics) are SHA-256 digests; ``expires`` is
# unix seconds on the server's clock (UNIX_TIMESTAMP()), so instances with skewed
# clocks agree.
MARK_TABLE = "mqtt_replay_mark"
TOMBSTONE_TABLE = "mqtt_replay_tombstone"
PENDING_TABLE = "mqtt_replay_pending"
MARK_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_replay_mark` ("
    "`conn_hash` binary(32) NOT NULL,"
    "`topic_hash` binary(32) NOT NULL,"
    "`position` double DEFAULT NULL,"
    "`expires` bigint NOT NULL,"
    "PRIMARY KEY (`conn_hash`, `topic_hash`),"
    "INDEX mqtt_replay_mark_expires(`expires`)"
    ") ENGINE=InnoDB"
)
TOMBSTONE_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_replay_tombstone` ("
    "`msgid` varchar(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
    "`expires` bigint NOT NULL,"
    "PRIMARY KEY (`msgid`),"
    "INDEX mqtt_replay_tombstone_expires(`expires`)"
    ") ENGINE=InnoDB"
)
PENDING_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_replay_pending` ("
    "`id` bigint unsigned NOT NULL AUTO_INCREMENT,"
    "`key_hash` binary(32) NOT NULL,"
    "`msgid` varchar(64) NOT NULL,"
    "`expires` bigint NOT NULL,"
    "PRIMARY KEY (`id`),"
    "INDEX mqtt_replay_pending_key(`key_hash`, `id`),"
    "INDEX mqtt_replay_pending_expires(`expires`)"
    ") ENGINE=InnoDB"
)
STATE_TABLES = (MARK_TABLE, TOMBSTONE_TABLE, PENDING_TABLE)
STATE_TABLES_DDL = (MARK_TABLE_DDL, TOMBSTONE_TABLE_DDL, PENDING_TABLE_DDL)
DEFAULT_SCHEMA_DDL = (MESSAGE_TABLE_DDL, SUBSCRIPTION_TABLE_DDL, *STATE_TABLES_DDL)
# mqtt_replay_tombstone.msgid and mqtt_replay_pending.msgid: varchar(64), ascii
BOOKKEEPING_ID_MAX = 64
