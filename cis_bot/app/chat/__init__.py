"""Chat commands in the rooms (docs/chat.md): the part that does I/O.

``service``: reading messages and reactions, who answers, authorisation, rate limits, replies.
``actions``: each command, through the control plane, the room's run log and room-level control
requests. ``starter``: a node's runs started and resumed from the chat. ``notices``: what waits
for people in a run driven here (a blocked session, an approval), answered by a reply or a
reaction. ``rooms``: what the chat knows of a room (members, power levels, heartbeats); ``view``:
a room's run log as one command reads it (trusted runs, and every run announced). The pure
parts (parsing, the command table, composing answers) are ``cis_bot/chat/``.
"""
