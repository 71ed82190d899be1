"""The embedded loopback Matrix homeserver (SQLite, one machine), shaped like Synapse:
``rest/`` (HTTP servlets), ``handlers/`` (logic), ``storage/`` (SQLite, one store per domain),
``appservice/`` (registrations and the transaction pusher), ``http/`` (HTTP/1.1 server and
client: asyncio around h11), wired by ``server.py``; ``homeserver.toml`` (``config.py``) holds
its settings. Import ``cis_bot.homeserver.server.EmbeddedHomeserver`` for the
in-process API; ``cis homeserver`` runs it in the foreground.

Synapse 1.163 is the reference: where they differ, Synapse is right. Deliberately absent:
federation (and event signatures), end-to-end encryption endpoints (keys, to-device), presence
(always "offline", as Synapse with presence disabled), push gateways, sliding sync, threads and
relations endpoints, room upgrades, open registration, 3PIDs, password changes, rate limits
other than on logins (Synapse's ``rc_login`` is there; no ``rc_message``, ``rc_joins``, ...),
thumbnailing, and pushing ephemeral events to appservices.
"""
