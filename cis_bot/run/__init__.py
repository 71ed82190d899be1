"""The asyncio side of one run, whatever the mode: the driver around the sans-I/O engine, the
Executor protocol it drives, and the local executor (tasks as sessions on this node).

``driver``: RunDriver, Executor, RunObserver. ``attempt``: how one attempt of a task becomes a
session (its environment, upstream files, transcript path), for the local executor and for a
worker alike. ``local``: LocalExecutor.
"""
