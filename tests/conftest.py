"""Shared fixtures live in tests/support/; this file only makes pytest see them."""

from tests.support.fixtures import (  # noqa: F401
    _netns_available,
    embedded,
    homeserver,
    homeserver_factory,
    homeserver_kind,
    http,
    netns,
    synapse,
    synapse_factory,
    synapse_federation,
    users,
)
