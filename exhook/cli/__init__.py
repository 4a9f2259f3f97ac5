"""The operator commands of the console script ``offline-exhook`` (docs/operate.md).

``exhook/main.py`` parses the command line (``parser.py``) and dispatches:

    check-config         effective_config.py  the config as the service sees it, secrets masked
    register             register.py          add/update this service in EMQX (REST /api/v5/exhooks)
    messages, subscriptions, purge, rebuild-topic-index
                         stored.py            read and clean the store (through storage.base.Store)

Output conventions (``output.py``): results go to stdout as tab-separated lines whose first
column names the record (``message``, ``count``, ``total`` ...) or as one JSON document with
``--json``; progress and notes go to stderr prefixed ``offline-exhook:``. Exit status 0 = done,
1 = failed (or a dry run that left something undone), 2 = configuration or usage error.
"""
