"""Session control from the terminal, across processes and machines.

``registry``: where each process's control API is found (the state directory).
``server``: the control API one process serves (its sessions, the runs it drives).
``room``: the same operations through a run's room, for sessions on other nodes.
``client`` / ``finder`` / ``terminal``: the CLI's side (``cis dag sessions``, ``logs``,
``attach``, ``input``, ``kill``, ``cancel``, ``approve``).
"""
