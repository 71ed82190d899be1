"""Uploaded media's metadata; the files live under the state directory (Synapse's
MediaRepositoryStore)."""

from __future__ import annotations

import attrs

from cis_bot.homeserver.storage.database import StoreBase, now_ms


@attrs.frozen
class MediaRow:
    media_id: str
    user_id: str
    content_type: str
    upload_name: str | None
    size: int


class MediaRepositoryStore(StoreBase):
    def add_media(
        self, media_id: str, user_id: str, content_type: str, upload_name: str | None, size: int
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO media (media_id, user_id, content_type, upload_name, size,"
                " created_ts) VALUES (?, ?, ?, ?, ?, ?)",
                (media_id, user_id, content_type, upload_name, size, now_ms()),
            )

    def get_media(self, media_id: str) -> MediaRow | None:
        row = self.conn.execute(
            "SELECT media_id, user_id, content_type, upload_name, size FROM media"
            " WHERE media_id = ?",
            (media_id,),
        ).fetchone()
        return None if row is None else MediaRow(row[0], row[1], row[2], row[3], row[4])
