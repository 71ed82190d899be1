"""A task's ``agent_config`` mapped onto its agent profile, and what cannot be checked without
the profiles: keys a profile cannot honour (reported, not ignored), a ``provider_type`` that is
not the profile's agent, an agent continued by a profile that has no way to continue one."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from cis_bot.dag.spec import AgentConfig, DagSpec
from cis_bot.errors import InputError
from cis_bot.session.profile import AgentProfile, ContinueVia
from cis_bot.session.profiles import VALUE_TOKEN

#: Keys cis_bot honours itself, whatever the profile.
_OWN = frozenset({"timeout_secs", "provider_type"})


def _given(config: AgentConfig) -> dict[str, str]:
    values = attrs.asdict(config)
    return {key: _text(value) for key, value in values.items() if value is not None}


def _text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_options(
    profile: AgentProfile, config: AgentConfig | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """(arguments, environment) that give the profile's CLI what ``config`` asks."""
    if config is None:
        return (), {}
    args: list[str] = []
    env: dict[str, str] = {}
    for key, value in _given(config).items():
        if key in profile.config_args:
            args += [part.replace(VALUE_TOKEN, value) for part in profile.config_args[key].split()]
        elif key in profile.config_env:
            env[profile.config_env[key]] = value
    return tuple(args), env


def unhonoured(profile: AgentProfile, config: AgentConfig | None) -> list[str]:
    """The keys of ``config`` the profile has no way to pass on."""
    if config is None:
        return []
    known = _OWN | profile.config_args.keys() | profile.config_env.keys()
    return [key for key in _given(config) if key not in known]


def check_with_profiles(spec: DagSpec, profiles: Mapping[str, AgentProfile]) -> list[str]:
    """Notes on what the profiles will not do as the DAG asks; InputError for what cannot run."""
    notes = []
    file = str(spec.source) if spec.source else None
    for task in spec.tasks:
        profile = profiles.get(task.agent)
        if profile is None:
            continue  # the spec's own check names unknown profiles
        config = task.agent_config
        provider = config.provider_type if config else None
        if provider is not None and provider != profile.provider:
            raise InputError(
                f"provider_type {provider!r} is not what agent profile {profile.name!r} runs "
                f"({profile.provider or 'no known agent'}); give a matching agent or leave "
                "provider_type out",
                file=file,
                task=task.id,
                key="agent_config.provider_type",
            )
        for key in unhonoured(profile, config) if task.reuse_agent is None else ():
            notes.append(
                f"task {task.id!r}: agent_config.{key} is not honoured: agent profile "
                f"{profile.name!r} has no way to pass it to its CLI (config_args / config_env)"
            )
        if task.reuse_agent is not None and profile.continue_via is ContinueVia.NONE:
            raise InputError(
                f"agent profile {profile.name!r} cannot continue the agent of task "
                f"{task.reuse_agent!r}: its CLI has no way back into a conversation (profiles "
                "that can: claude, claude-interactive, kimi)",
                file=file,
                task=task.id,
                key="reuse_agent",
            )
    return notes
