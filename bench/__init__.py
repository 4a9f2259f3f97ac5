"""Benchmark of offline-exhook (not part of the tests): ``make bench`` or
``.venv/bin/python -m bench --help``.

One run measures, side by side, on this machine:

1. ``no-op``: a grpc.aio ExHook server that answers every call at once (``bench/noop.py``),
   the ceiling of any Python ExHook server here;
2. ``service/<backend>``: the real service (``python -m exhook --config ... --workers N``)
   on Redis, MariaDB (a fresh database, ``init_default_schema = true``) and SQLite (temp
   dir), ``topics = ["bench/#"]``;

each under the same load (``bench/loadgen.py``): EMQX-like, a pool of gRPC connections,
calls routed by clientid, a fixed number of virtual clients each with one
``OnMessagePublish`` in flight, QoS 1, 32-hex GUID ids, ``bench/t/<n>`` topics, from
several load-generator processes. Rows of the table:

- ``OnMessagePublish``: throughput over the measured window, latency p50/p99/p99.9 of the
  calls started in it, ``vs no-op`` = throughput / no-op throughput, server CPU per
  answered call (utime+stime of the server's process tree over the phase), server RSS
  (VmRSS summed over its processes) idle -> after the phase (peak);
- ``OnMessageAcked``: every published message acknowledged (deletes), same concurrency;
  for the service also the time until the store is empty again;
- ``replay N``: N messages stored on one topic (16 publishers, each in its own order), then
  ``OnSessionSubscribed`` of a new subscriber; the service replays through the REST
  stand-in (``bench/standin.py``: ``publish/bulk`` = one sequential ``OnMessagePublish``
  per item, like EMQX); msg/s = N / time to the last delivery; checked: complete, no
  duplicates, each publisher's order kept, the store empty after the subscriber's acks;
  p columns = the service's answer time to the replay publishes measured on the wire
  (``bench/wire.py``, tcpdump), the stand-in's round trip in the notes;
- ``raw <backend>``: the same writes straight to the backend, batches of ``batch_size``
  from one connection (``bench/raw.py``): the backend's ceiling.

Options: ``--big`` (1,000,000 stored: publish throughput with a full store, RSS after
10k vs 1M stored+acknowledged), ``--profile DIR`` (py-spy, extra phases), backend and
duration selection. The table is printed and written between markers in BENCHMARKS.md.
"""
