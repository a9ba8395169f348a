"""A tool-using agent over the engine (``llmlab agent MODEL "task"``): see :mod:`.loop` for the loop,
:mod:`.tools` for the tools, :mod:`.policy` for the model side, :mod:`.tasks` for the evaluation tasks."""

from llmlab.apps.agent.loop import Agent, AgentConfig, AgentResult, AgentRun, Step, run_agents
from llmlab.apps.agent.policy import Completion, EnginePolicy, Request, ServerPolicy
from llmlab.apps.agent.tools import Tool, make_tools

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentResult",
    "AgentRun",
    "Completion",
    "EnginePolicy",
    "Request",
    "ServerPolicy",
    "Step",
    "Tool",
    "make_tools",
    "run_agents",
]
