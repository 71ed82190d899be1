"""The dev cluster: a homeserver, a coordinator that answers chat commands, N workers, a person
and a room, on this machine as local processes (``cis dev-cluster``), the same topology that
``docker-compose.yml`` runs in containers (``synapse-dev/``).

- ``topology.py``: names, ids, the node configs and the first DAG, for both (pure);
- ``layout.py``: the cluster's directory, what a second ``up`` reuses;
- ``homeservers.py``: the embedded homeserver or Synapse as a child process, the person's account;
- ``synapse.py``: Synapse's config, finding a Synapse, shared-secret registration;
- ``room.py``: the person's client, the room, the nodes' heartbeats;
- ``supervisor.py``: starting, watching and stopping the processes (foreground or detached);
- ``control.py``: ``down`` and ``status`` from another process.
"""
