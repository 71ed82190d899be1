"""The homeserver's storage: one object made of the per-domain stores, as Synapse's
``DataStore`` is. Each domain's queries live in its own module; ``database.py`` holds the
connection, transactions and the global stream they share."""

from __future__ import annotations

from cis_bot.homeserver.storage.account_data import AccountDataStore
from cis_bot.homeserver.storage.appservice import ApplicationServiceTransactionStore
from cis_bot.homeserver.storage.device_inbox import DeviceInboxStore
from cis_bot.homeserver.storage.directory import DirectoryStore
from cis_bot.homeserver.storage.e2e_keys import EndToEndKeyStore
from cis_bot.homeserver.storage.e2e_room_keys import EndToEndRoomKeyStore
from cis_bot.homeserver.storage.events import EventsStore
from cis_bot.homeserver.storage.filtering import FilteringStore
from cis_bot.homeserver.storage.media_repository import MediaRepositoryStore
from cis_bot.homeserver.storage.presence import PresenceStore
from cis_bot.homeserver.storage.push_rule import PushRuleStore
from cis_bot.homeserver.storage.receipts import ReceiptsStore
from cis_bot.homeserver.storage.registration import RegistrationStore
from cis_bot.homeserver.storage.room import RoomStore
from cis_bot.homeserver.storage.roommember import RoomMemberStore
from cis_bot.homeserver.storage.transactions import RequestTransactionStore


class Store(
    RegistrationStore,
    RoomStore,
    EventsStore,
    RoomMemberStore,
    DirectoryStore,
    FilteringStore,
    AccountDataStore,
    ReceiptsStore,
    MediaRepositoryStore,
    RequestTransactionStore,
    ApplicationServiceTransactionStore,
    PushRuleStore,
    EndToEndKeyStore,
    DeviceInboxStore,
    EndToEndRoomKeyStore,
    PresenceStore,
):
    def close(self) -> None:
        self.conn.close()

    def server_name(self) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'server_name'").fetchone()
        return None if row is None else str(row[0])

    def claim_server_name(self, server_name: str) -> None:
        """Record the server name on first use; a database keeps the name its ids carry."""
        current = self.server_name()
        if current is None:
            with self.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('server_name', ?)",
                    (server_name,),
                )
        elif current != server_name:
            raise ValueError(f"{self.path} belongs to server name {current!r}, not {server_name!r}")
