"""Session control from the terminal, across processes and machines.

The side that acts (in every process that holds sessions or drives runs):
``operations``: the ControlPlane, what the process holds and what may be done to it (input,
kill, logs, cancel, approve); ``api``: the plane over HTTP/WebSocket on the process's unix
socket; ``room``: the same operations for requests posted in a run's room; ``service``: starting
all of it. ``registry``: where each process's API is found (both sides read it).

The side that asks (the CLI): ``client/``.
"""
