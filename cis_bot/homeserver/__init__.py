"""The embedded loopback Matrix homeserver (SQLite, one machine), shaped like Synapse:
``rest/`` (HTTP servlets), ``handlers/`` (logic), ``storage/`` (SQLite, one store per domain),
``appservice/`` (registrations and the transaction pusher), ``http/`` (HTTP/1.1 server and
client: asyncio around h11), wired by ``server.py``; ``homeserver.toml`` (``config.py``) holds
its settings. Import ``cis_bot.homeserver.server.EmbeddedHomeserver`` for the
in-process API; ``cis homeserver`` runs it in the foreground.

Synapse 1.163 is the reference: where they differ, Synapse is right. End-to-end encryption is
stored and relayed (device, one-time, fallback and cross-signing keys, signatures, to-device
messages, key backups) with no cryptography on the server: uploaded signatures are kept, not
verified. Deliberately absent, answered with the spec's 404 ``M_UNRECOGNIZED`` where a client
asks: federation (and event signatures), push gateways (``/pushers/set``), sliding sync,
threads and relations endpoints, room upgrades, open registration, 3PIDs, password changes,
SSO and OIDC, dehydrated devices, MatrixRTC transports, reporting, room summaries,
thumbnailing. Also absent: rate limits other than on logins (Synapse's ``rc_login`` is there;
no ``rc_message``, ``rc_joins``, ...), and pushing ephemeral events and to-device messages to
appservices.
"""
