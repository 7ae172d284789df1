"""Trajectories in Harbor's Agent Trajectory Interchange Format (ATIF v1.4), so runs can be
compared with other agents' runs in Harbor's viewer and tools.

We emit: root `schema_version`, `session_id`, `agent` {name, version, model_name},
`steps`, `final_metrics` {total_prompt_tokens, total_completion_tokens, total_cached_tokens,
total_steps}; per step `step_id` (1, 2, ...), `timestamp`, `source` (system | user | agent),
`message`, and on agent steps `model_name`, `reasoning_content`, `tool_calls`
[{tool_call_id, function_name, arguments}], `observation` {results: [{source_call_id,
content}]} and `metrics` {prompt_tokens, completion_tokens, cached_tokens}.

Sources: `v4agent fix`'s trajectory.jsonl (its `run` record's issue, each `turn`'s assistant
message, tool results and token stats, feedback sent back), chat messages in OpenAI style
(role, content, reasoning_content, tool_calls, tool results as role "tool" with tool_call_id,
an optional per-message `usage`), or, for the oracle, the solution script as one tool call.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = "ATIF-v1.4"
_METRICS = ("prompt_tokens", "completion_tokens", "cached_tokens")


def _timestamp(value: Any) -> str:
    """`value` as an ISO 8601 timestamp if it is one in any spelling, else now."""
    try:
        return datetime.fromisoformat(value).isoformat()
    except (TypeError, ValueError):
        return datetime.now(timezone.utc).isoformat()


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw or "{}")
    except (TypeError, json.JSONDecodeError):
        return {"raw": raw}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(str(part.get("text") or "") for part in content if isinstance(part, dict))
    if content is None:
        return ""
    return content if isinstance(content, str) else json.dumps(content)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trajectory(messages: list[dict[str, Any]], *, session_id: str, agent: str, version: str,
               model: str | None = None) -> dict[str, Any]:
    """An ATIF trajectory from chat messages; tool results join the agent step that called them.
    A result whose id matches none of that step's calls keeps its content without an id (ATIF
    allows no dangling reference); one before any step gets a system step of its own. ValueError
    for no messages at all: a trajectory has at least one step."""
    steps: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            if not steps:
                steps.append({"step_id": 1, "timestamp": _timestamp(message.get("timestamp")), "source": "system",
                              "message": ""})
            step = steps[-1]
            result: dict[str, Any] = {"content": _text(message.get("content"))}
            call_id = message.get("tool_call_id")
            if call_id is not None and str(call_id) in {c["tool_call_id"] for c in step.get("tool_calls", [])}:
                result = {"source_call_id": str(call_id), **result}
            step.setdefault("observation", {"results": []})["results"].append(result)
            continue
        source = {"assistant": "agent", "developer": "system"}.get(role, role)
        if source not in ("system", "user", "agent"):
            continue
        step = {"step_id": len(steps) + 1, "timestamp": _timestamp(message.get("timestamp")), "source": source,
                "message": _text(message.get("content"))}
        if source == "agent":
            if model:
                step["model_name"] = model
            if message.get("reasoning_content"):
                step["reasoning_content"] = _text(message["reasoning_content"])
            calls = message.get("tool_calls") or []
            if calls:
                step["tool_calls"] = [{"tool_call_id": str(c.get("id") or f"call_{step['step_id']}_{i}"),
                                       "function_name": str((c.get("function") or {}).get("name") or ""),
                                       "arguments": _arguments((c.get("function") or {}).get("arguments"))}
                                      for i, c in enumerate(calls)]
            usage = message.get("usage") or {}
            metrics = {k: usage[k] for k in _METRICS if _is_count(usage.get(k))}
            if metrics:
                step["metrics"] = metrics
        steps.append(step)
    if not steps:
        raise ValueError("no messages to make a trajectory of: ATIF needs at least one step")
    totals = {f"total_{k}": sum(s.get("metrics", {}).get(k, 0) for s in steps) for k in _METRICS}
    return {"schema_version": SCHEMA_VERSION, "session_id": session_id,
            "agent": {"name": agent, "version": version, **({"model_name": model} if model else {})},
            "steps": steps, "final_metrics": {**totals, "total_steps": len(steps)}}


def script_messages(instruction: str, command: str, output: str) -> list[dict[str, Any]]:
    """The messages of a run that is one shell command (the oracle's solution script)."""
    call = {"id": "call_1", "function": {"name": "run", "arguments": json.dumps({"command": command})}}
    return [{"role": "user", "content": instruction},
            {"role": "assistant", "content": "Running the reference solution.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": output}]


def v4_messages(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from `v4agent fix`'s trajectory records (agent/trajectory.py)."""
    messages: list[dict[str, Any]] = []
    for record in records:
        if record.get("type") == "run":
            messages.append({"role": "user", "content": record.get("issue", ""), "timestamp": record.get("started")})
        elif record.get("type") == "turn":
            stats = record.get("stats") or {}
            usage = {"prompt_tokens": stats.get("prompt_tokens"), "completion_tokens": stats.get("output_tokens"),
                     "cached_tokens": stats.get("cached_tokens")}
            messages.append({**record.get("assistant", {"role": "assistant"}), "usage": usage})
            messages += [{"role": "tool", "tool_call_id": r.get("id"), "content": r.get("output", "")}
                         for r in record.get("results", [])]
            if record.get("feedback"):
                messages.append({"role": "user", "content": record["feedback"]})
    return messages


def load_messages(text: str) -> list[dict[str, Any]]:
    """Chat messages from a JSON list, an object with `messages`, JSON lines of messages, or
    v4agent's trajectory records."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    messages = data.get("messages", []) if isinstance(data, dict) else data
    return v4_messages(messages) if any("type" in m for m in messages) else messages
