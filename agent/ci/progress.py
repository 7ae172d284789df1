"""How a run goes, for people who are not watching it: `Tally` counts turns and tokens and keeps
the commands the model ran; `Progress` is the one comment on the issue or pull request that says
so, posted at the start and edited as turns end (at most every `interval_s`) and at the end.

Both are listeners of the agent's live events. A comment that cannot be edited mid-run is
reported on the console and the run goes on.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field

from agent.ci.github import GitHubError, Repository
from agent.ci.pull import commands_block, fenced
from agent.cli.common import visible

TAIL_LINES = 30  # of the last command's output, shown when there is no patch
_EXIT = re.compile(r"\[exit code (-?\d+)([^\]]*)\]")


@dataclass
class Tally:
    """Turns, tokens, and the commands run as (command, how it ended), with the last one's output."""

    turns: int = 0
    tokens_in: int = 0
    cached: int = 0
    tokens_out: int = 0
    commands: list[tuple[str, str]] = field(default_factory=list)
    last_output: str = ""

    def __call__(self, event: object) -> None:
        from agent.loop import ToolRan, TurnFinished

        if isinstance(event, TurnFinished):
            self.turns = event.turn
            self.tokens_in += event.stats.prompt_tokens
            self.cached += event.stats.cached_tokens
            self.tokens_out += event.stats.output_tokens
        elif isinstance(event, ToolRan) and event.name == "run":
            try:
                command = str(json.loads(event.arguments)["command"])
            except (ValueError, KeyError, TypeError):
                command = event.arguments
            found = _EXIT.match(event.result.output)
            ended = f"exit {found.group(1)}{found.group(2)}" if found else f"error: {event.result.output[:200]}"
            self.commands.append((command, ended))
            self.last_output = event.result.output

    def line(self) -> str:
        return (f"{self.turns} turns; {self.tokens_in:,} tokens in ({self.cached:,} cached), "
                f"{self.tokens_out:,} out")


class Progress:
    """The progress comment on issue or pull request `number` of `repository`; `link` is the job's page."""

    def __init__(self, repository: Repository, number: int, link: str | None, interval_s: float = 20.0) -> None:
        self.repository, self.link, self.interval_s = repository, link, interval_s
        self.tally = Tally()
        self.state = "working on it"
        self.outcome = ""
        self.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.comment = repository.comment(number, self.render())
        self._edited = time.monotonic()

    def __call__(self, event: object) -> None:
        from agent.loop import TurnFinished

        self.tally(event)
        if isinstance(event, TurnFinished) and time.monotonic() - self._edited >= self.interval_s:
            self._edit()

    def finish(self, state: str, outcome: str) -> None:
        """The last edit: how the run ended (`state`, one line) and what came of it (markdown)."""
        self.state, self.outcome = state, outcome
        self._edit()

    def no_patch(self, why: str) -> None:
        """The run made no patch: say why, with the end of the last command's output."""
        tail = "\n".join(self.tally.last_output.splitlines()[-TAIL_LINES:])
        self.finish("no patch", fenced(why) + (f"\n\nThe last command's output (its end):\n\n{fenced(tail)}"
                                               if tail else ""))

    def render(self) -> str:
        job = f" ([the job]({self.link}))" if self.link else ""
        parts = [f"**v4agent**: {visible(self.state)}{job}",
                 f"Started {self.started}; {self.tally.line()}."]
        if self.tally.commands:
            parts.append("Commands run:\n\n" + commands_block(self.tally.commands))
        if self.outcome:
            parts.append(self.outcome)
        return "\n\n".join(parts)

    def _edit(self) -> None:
        try:
            self.repository.edit_comment(self.comment, self.render())
        except GitHubError as e:
            print(visible(f"warning: the progress comment was not updated: {e}"), file=sys.stderr)
        self._edited = time.monotonic()
