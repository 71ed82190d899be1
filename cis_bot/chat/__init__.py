"""Chat commands, the pure parts: what a person types and what they are answered, without I/O.

``commands``: the command table, parsing, help. ``incoming``: reading a Matrix message (a rich
reply's fallback stripped, threads, edits, attached files, reactions). ``compose``: replies as
Matrix content (rich replies, threads, HTML tables, code blocks, mentions). ``ratelimit``: a
token bucket per sender. The part that does I/O, answering in rooms, is ``cis_bot/app/chat/``.
"""
