"""What a cis process does, in every mode: connect its node to a homeserver, run a DAG (the one
entry point for local, hybrid and matrix modes), pick a run up again, serve as a long-lived node.

``connect``: the node on the configured homeserver, or on the local one in the state directory
(``localhs``: that directory). ``execute``: a new run. ``drive``: driving a run in its room to
its end, new or picked up. ``resume``: ``cis dag resume``. ``serve``: ``cis node``. ``dryrun``:
runs whose agents talk to a fake model.
"""
