"""The dev cluster's failures that are not the user's input."""

from __future__ import annotations

from cis_bot.errors import UserError


class ClusterError(UserError):
    """The cluster could not start or stop (a process died, the homeserver refused): one clear
    message with where to look, exit status 1."""

    exit_code = 1


class NoCluster(UserError):
    """``--dir`` names a directory where no ``up`` ever ran: a usage mistake (exit status 2)."""
