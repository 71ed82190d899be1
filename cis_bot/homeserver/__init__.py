"""The embedded loopback Matrix homeserver (SQLite, one machine), shaped like Synapse:
``rest/`` (HTTP servlets), ``handlers/`` (logic), ``storage/`` (SQLite), ``appservice/``
(registrations and the transaction pusher), wired by ``server.py``.

Import ``cis_bot.homeserver.server.EmbeddedHomeserver`` for the in-process API.
"""
