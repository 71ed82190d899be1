"""Agents kept for later tasks (``keep_agent`` / ``reuse_agent``), on the node that runs them.

A task that keeps its agent (``TaskSpec.keep_agent``: a later task continues it) leaves, when its
session completes, either a parked process (profiles that continue through the PTY: the next
prompt is typed into it) or a conversation on disk (profiles that resume: the next task's CLI is
started with the profile's ``resume_args``). A task that names it in ``reuse_agent`` continues it;
if it is gone (its process died, its task failed, this node restarted) the attempt fails saying
so, and a retry of the task starts a fresh agent, saying that, without the earlier turns. The
agent ends after the last task that uses it (that task does not keep it), or with the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import attrs
import structlog

from cis_bot.dag.spec import TaskSpec
from cis_bot.session.events import SessionCompleted, SessionState
from cis_bot.session.manager import SessionManager, SessionSpec
from cis_bot.session.profile import ContinueVia
from cis_bot.session.session import AgentSession

log = structlog.get_logger(__name__)


@attrs.define
class KeptAgent:
    #: The session whose UUID names the conversation.
    conversation: str
    #: The parked agent (profiles that continue through the PTY).
    session: AgentSession | None = None

    def gone(self) -> str | None:
        """Why it cannot be continued, or None."""
        if self.session is None:
            return None
        if not self.session.parked:
            return self.session.agent_ended or "its process has exited"
        return None


@attrs.frozen
class _Use:
    run_id: str
    owner: str
    keep: bool
    via: ContinueVia


class AgentKeeper:
    """The agents this node keeps, by (run, the task that keeps them)."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self._agents: dict[tuple[str, str], KeptAgent] = {}
        #: Why an agent ended, for a task that names it afterwards.
        self._ended: dict[tuple[str, str], str] = {}
        #: What each session that uses a kept agent is doing with it.
        self._uses: dict[str, _Use] = {}

    def prepare(self, spec: SessionSpec, task: TaskSpec, run_id: str, attempt: int) -> SessionSpec:
        """The session for an attempt of ``task``, keeping or continuing its agent."""
        via = spec.profile.continue_via
        if via is ContinueVia.NONE or not (task.keep_agent or task.reuse_agent):
            return spec
        owner = task.reuse_agent or task.id
        self._uses[spec.session_id] = _Use(run_id, owner, task.keep_agent, via)
        keep_args = spec.profile.keep_args if task.keep_agent else ()
        fresh = attrs.evolve(spec, keep=task.keep_agent, options=(*spec.options, *keep_args))
        if task.reuse_agent is None:
            return fresh
        key = (run_id, owner)
        agent = self._agents.get(key)
        gone = agent.gone() if agent else self._ended.get(key, f"task {owner} kept none here")
        if gone is None:
            assert agent is not None
            log.info("agent.continued", session_id=spec.session_id, conversation=agent.conversation)
            if via is ContinueVia.PTY:
                return attrs.evolve(
                    spec,
                    keep=task.keep_agent,
                    continues=agent.session,
                    conversation=agent.conversation,
                )
            resume = spec.profile.resume_args
            return attrs.evolve(
                spec, options=(*spec.options, *resume), conversation=agent.conversation
            )
        self._forget(key, gone)
        if attempt == 1:
            return attrs.evolve(
                spec,
                refuse=f"the agent of task {owner} is gone ({gone}): the conversation cannot go "
                "on; a retry of this task starts a fresh agent",
            )
        log.warning("agent.fresh", session_id=spec.session_id, owner=owner, gone=gone)
        return attrs.evolve(
            fresh,
            notice=f"a fresh agent: the agent of task {owner} is gone ({gone}), and with it the "
            "conversation so far",
        )

    def completed(self, event: SessionCompleted) -> None:
        """A session ended: the agent it kept, or the end of the agent it used."""
        use = self._uses.pop(event.session_id, None)
        if use is None:
            return
        key = (use.run_id, use.owner)
        if event.state is not SessionState.COMPLETED and key not in self._agents:
            return  # it was gone already (and said why)
        session = self.manager.get(event.session_id)
        conversation = session.conversation if session is not None else event.session_id
        if use.keep and event.state is SessionState.COMPLETED:
            parked = session if use.via is ContinueVia.PTY else None
            if use.via is ContinueVia.PTY and (parked is None or not parked.parked):
                self._forget(key, "its process exited when its turn was over")
                return
            self._agents[key] = KeptAgent(conversation, parked)
            self._ended.pop(key, None)
        elif event.state is SessionState.COMPLETED:
            self._forget(key, f"the last task that used it ({event.session_id}) ended it")
        else:
            self._forget(key, f"its session {event.session_id} {event.state}: {event.error}")

    def _forget(self, key: tuple[str, str], why: str) -> None:
        self._agents.pop(key, None)
        self._ended[key] = why

    async def release_run(self, run_id: str, *, grace_secs: float | None = None) -> None:
        """End every agent kept for the run (it is over)."""
        ending = [key for key in self._agents if key[0] == run_id]
        releases = []
        for key in ending:
            agent = self._agents.pop(key)
            self._ended[key] = "the run ended"
            if agent.session is not None:
                releases.append(agent.session.release("the run ended", grace_secs=grace_secs))
        if releases:
            log.info("agents.released", run_id=run_id, count=len(releases))
            await asyncio.gather(*releases)

    @property
    def kept(self) -> Mapping[tuple[str, str], KeptAgent]:
        return self._agents
