"""Benchmark of offline-exhook (not part of the tests): ``make bench`` or
``.venv/bin/python -m bench --help``.

One run measures, side by side and under the same load, the no-op ExHook server
(``bench/noop.py``: answers at once, registers the hook set the service registers, the
ceiling of any Python ExHook server here) and the service (``python -m exhook --config
... --workers N``) on SQLite (temp dir), MariaDB (a fresh database, ``init_default_schema
= true``) and Redis (a fresh key prefix), ``topics = ["bench/#"]``. Everything is done
once per ExHook package: v3 (``emqx.exhook.v3.HookProvider``, EMQX 5.9+) and v2
(``emqx.exhook.v2.HookProvider``, EMQX 5.0-5.8); each (protocol, target) gets its own
server process, so a v2 call never changes how the service treats v3.

Phases (``--phases``):

- ``publish``: N simulated MQTT clients (``--clients``, default 1, 4, 32, 256), each with
  exactly one ``OnMessagePublish`` in flight (the next only after the answer: EMQX runs
  the hook in the publishing client's process and waits for it), QoS 1, 300-byte
  payloads, 32-hex EMQX-like ids, ``from`` = the clientid, headers protocol/peerhost/
  username; over EMQX's pool of 8 gRPC connections, each client on the connection its
  clientid hashes to (``bench/loadgen.py``). Per N: msg/s, answer time p50/p99/p99.9, server
  CPU µs per call (utime+stime of the server's process tree from /proc), cores used.
- ``mixed``: N publishers as above, each topic with one online subscriber whose
  ``OnMessageAcked`` (routed by the subscriber's clientid) follows each answered publish,
  one ack in flight per subscriber; msg/s = messages published and acknowledged.
- ``replay``: N messages stored on one topic by 16 publishers, then a new subscriber's
  ``OnSessionSubscribed``; the service replays through the REST stand-in
  (``bench/standin.py``: ``publish/bulk`` = one sequential ``OnMessagePublish`` per item,
  like EMQX); checked: complete, in order, no duplicates, store back to its size after the
  subscriber's acks. The no-op's row is the sequential replay ceiling: the same
  ``publish/bulk`` batches posted by the benchmark itself. Answer times on the wire
  (``bench/wire.py``, tcpdump) when tcpdump is installed.
- ``raw``: the backends' own ceilings from one connection (batches of ``batch_size``), and
  what ONE commit costs (SQLite synchronous=FULL vs NORMAL, MariaDB with its configured
  ``innodb_flush_log_at_trx_commit``, Redis one message's pipeline) (``bench/raw.py``).
- ``storm``: the reconnect storm through the EMQX emulator (``bench/storm.py``): N clients
  (``--storm``) with one stored subscription and message each reconnect at once with a
  clean session; time until all are restored and replayed, CONNACK-hook answer times,
  failed hook calls, duplicates, server and emulator CPU; for every target with 1 and 2
  workers (``--storm-workers``).

Extras: ``--profile DIR`` (py-spy, extra unmeasured phases), ``--big`` (1,000,000 stored:
publish throughput with a full store, RSS after 10k vs 1M stored+acknowledged),
``--quick`` (smoke run). The tables, with the targets of issues 11 and 14 as met/MISSED
lines, are printed and written between markers in BENCHMARKS.md (``bench/report.py``).
"""
