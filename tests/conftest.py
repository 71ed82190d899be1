"""Shared fixtures live in tests/support/; this file only makes pytest see them."""

from tests.support.fixtures import (  # noqa: F401
    embedded,
    homeserver,
    homeserver_factory,
    homeserver_kind,
    http,
    synapse,
    synapse_factory,
    users,
)
