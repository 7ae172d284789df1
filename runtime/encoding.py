"""DeepSeek-V4 prompt encoding: OpenAI-style messages -> prompt text -> token ids.

The wire format is the one V4 was trained on (the project spec encoding-dsml.md and the
official reference encoder; docs/encoding.md sums up the rules): every string below is a
protocol constant, one wrong character silently degrades the model. Token ids are produced
piece by piece: the text is
cut around structural special tokens, which the tokenizer never merges with neighbouring
text, so the ids of the pieces concatenate to exactly the ids of the whole prompt. That is
what lets `PromptEncoder` reuse the ids of an unchanged prefix and `TokenCache` reuse the
ids of a file it has seen before.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.tokenizer import Tokenizer

# ---- special tokens (each one id in the V4 tokenizer) ------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
FILE_NAME_BEGIN = "<｜begin▁of▁file▁name｜>"
FILE_NAME_END = "<｜end▁of▁file▁name｜>"
FILE_BEGIN = "<｜begin▁of▁file｜>"
FILE_END = "<｜end▁of▁file｜>"

# Where the text is cut into independently tokenized pieces. ｜DSML｜ is left out on purpose:
# the added token `<｜/table>｜` ends with its first character, so a cut there could differ
# from the tokenizer's own leftmost match. tests/test_encoding.py checks the others.
SPLIT_TOKENS = (
    BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, LATEST_REMINDER,
    FILE_NAME_BEGIN, FILE_NAME_END, FILE_BEGIN, FILE_END,
)

# ---- DSML tags (plain text around the ｜DSML｜ token) -------------------------------------
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"
# A parameter value ends at the first occurrence of this (the reference's rule): a value that
# contains it cannot be written, and a value that does not end with "<" before it is malformed.
VALUE_END = f"/{DSML}parameter"
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

# ---- fixed prompt texts -------------------------------------------------------------------
EFFORT_PREFIX_A = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
EFFORT_PREFIX_B = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
    "resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
    "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)
# Effort prefix per thinking mode, per release of the weights.
EFFORT_PROFILES: dict[str, dict[str, str]] = {
    "preview": {"none": "", "high": "", "max": EFFORT_PREFIX_A},  # April 2026 preview
    "v2": {"none": "", "high": EFFORT_PREFIX_A, "max": EFFORT_PREFIX_B},  # later low/high/max release
}
THINK_MODES = ("none", "high", "max")

TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "{TOOL_CALLS_OPEN}" block like the following:

{TOOL_CALLS_OPEN}
{INVOKE_OPEN} name="$TOOL_NAME">
{PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAM_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$TOOL_NAME2">
...
{INVOKE_CLOSE}
{TOOL_CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete reasoning inside {THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

ROLES = ("system", "user", "developer", "assistant", "tool", "latest_reminder")


class EncodingError(ValueError):
    """A message list that cannot be rendered (unknown role, malformed tools or arguments)."""


@dataclass(frozen=True)
class PromptSettings:
    """How a prompt is rendered.

    think: "none" (the prompt ends with `</think>`), "high" or "max" (ends with `<think>`).
    effort_profile: which release's effort prefixes apply ("preview" or "v2").
    drop_thinking: drop the reasoning of turns before the last user turn; ignored (nothing is
        dropped) as soon as any message carries tools, which keeps tool-using prompts append-only.
    """

    think: str = "high"
    effort_profile: str = "preview"
    drop_thinking: bool = True

    def __post_init__(self) -> None:
        if self.think not in THINK_MODES:
            raise EncodingError(f"think must be one of {', '.join(THINK_MODES)}, not {self.think!r}")
        if self.effort_profile not in EFFORT_PROFILES:
            raise EncodingError(
                f"effort_profile must be one of {', '.join(EFFORT_PROFILES)}, not {self.effort_profile!r}"
            )

    @property
    def thinking(self) -> bool:
        """True in think-high and think-max."""
        return self.think != "none"

    @property
    def effort_prefix(self) -> str:
        """The text written right after BOS ("" when the mode needs none)."""
        return EFFORT_PROFILES[self.effort_profile][self.think]


def to_json(value: Any) -> str:
    """JSON as it appears in V4 prompts: non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


# ---- rendering ----------------------------------------------------------------------------
def _text(content: Any) -> str:
    """Message content as text: a string, None, or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(
            part.get("text", "") if part.get("type") == "text" else f"[Unsupported {part.get('type')}]"
            for part in content
        )
    raise EncodingError(f"content must be a string or a list of parts, not {type(content).__name__}")


def _tools_block(tools: Any) -> str:
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) and "function" in t for t in tools):
        raise EncodingError('tools must be a list of OpenAI tools: [{"type": "function", "function": {...}}]')
    return TOOLS_TEMPLATE.replace("{schemas}", "\n".join(to_json(t["function"]) for t in tools))


def _call_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of an OpenAI tool call; arguments that are not JSON at all are kept
    whole as one string parameter named "arguments", as the reference does."""
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise EncodingError('a tool call must look like {"function": {"name": ..., "arguments": ...}}')
    raw = function.get("arguments", "{}")
    if isinstance(raw, str):
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            arguments = {"arguments": raw}
    else:
        arguments = raw
    if not isinstance(arguments, Mapping):
        raise EncodingError(f"tool call {function['name']!r}: arguments must be a JSON object")
    return function["name"], dict(arguments)


def _parameter(name: str, value: Any) -> str:
    is_string = isinstance(value, str)
    text = value if is_string else to_json(value)
    if VALUE_END in text:
        # DSML has no escaping: the parser would end the value there.
        raise EncodingError(f"parameter {name!r} contains {VALUE_END!r}, which DSML cannot represent")
    flag = "true" if is_string else "false"
    return f'{PARAM_OPEN} name="{name}" string="{flag}">{text}{PARAM_CLOSE}'


def _tool_calls_block(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    invokes = []
    for call in tool_calls:
        name, arguments = _call_arguments(call)
        parameters = "\n".join(_parameter(key, value) for key, value in arguments.items())
        invokes.append(f'{INVOKE_OPEN} name="{name}">\n{parameters}\n{INVOKE_CLOSE}')
    return f"\n\n{TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


def _assistant(message: Mapping[str, Any], with_reasoning: bool) -> str:
    reasoning = _text(message.get("reasoning_content")) + THINK_CLOSE if with_reasoning else ""
    calls = _tool_calls_block(message["tool_calls"]) if message.get("tool_calls") else ""
    return reasoning + _text(message.get("content")) + calls + EOS


def _instructions(message: Mapping[str, Any]) -> str:
    """A system or developer message's content with its tools and response-format blocks."""
    text = _text(message.get("content"))
    if message.get("tools"):
        text += "\n\n" + _tools_block(message["tools"])
    if message.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT_HEADER + to_json(message["response_format"])
    return text


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages as wire turns: consecutive user and tool messages merge into one user
    turn {"role": "user", "blocks": [(tool_call_id or None, block text), ...]}."""
    turns: list[Mapping[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, Mapping) else message
            raise EncodingError(f"message {index}: role must be one of {', '.join(ROLES)}, not {role!r}")
        role = message["role"]
        if message.get("tools") and role not in ("system", "developer"):
            raise EncodingError(f"message {index}: tools belong on a system or developer message, not {role}")
        if role == "developer" and not message.get("content"):
            raise EncodingError(f"message {index}: a developer message needs content")
        if role == "tool":
            result = TOOL_RESULT_OPEN + _text(message.get("content")) + TOOL_RESULT_CLOSE
            block = (str(message.get("tool_call_id", "")), result)
        elif role == "user":
            block = (None, _text(message.get("content")))
        else:
            turns.append(message)
            continue
        if turns and turns[-1]["role"] == "user":
            turns[-1]["blocks"].append(block)
        else:
            turns.append({"role": "user", "blocks": [block]})
    return turns


def _ordered_blocks(blocks: list[tuple[str | None, str]], call_order: Mapping[str, int]) -> list[str]:
    """Block texts, tool results permuted into the order of the calls that produced them
    (text blocks keep their places; unknown ids sort first, as in the reference)."""
    results = iter(sorted((b for b in blocks if b[0] is not None), key=lambda b: call_order.get(b[0], 0)))
    return [next(results)[1] if tool_id is not None else text for tool_id, text in blocks]


def render_prompt(messages: Sequence[Mapping[str, Any]], settings: PromptSettings = PromptSettings()) -> str:
    """The prompt text for `messages` (OpenAI style, plus the V4 roles `developer` and
    `latest_reminder`). A prompt whose last turn is a user turn ends with the generation
    prompt `<｜Assistant｜><think>` (or `</think>` in non-think mode)."""
    turns = _turns(messages)
    has_tools = any(message.get("tools") for message in messages)
    drop = settings.thinking and settings.drop_thinking and not has_tools
    if drop:
        # The reference drops developer turns that precede the last user turn.
        last = _last_user(turns)
        turns = [t for i, t in enumerate(turns) if i >= last or t["role"] != "developer"]
    last_user = _last_user(turns)

    out = [BOS, settings.effort_prefix if turns else ""]
    call_order: dict[str, int] = {}
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            out.append(USER + "\n\n".join(_ordered_blocks(turn["blocks"], call_order)))
        elif turn["role"] == "assistant":
            out.append(_assistant(turn, settings.thinking and (not drop or i > last_user)))
            if turn.get("tool_calls"):
                call_order = {str(c.get("id")): n for n, c in enumerate(turn["tool_calls"]) if c.get("id")}
        elif turn["role"] == "system":
            out.append(_instructions(turn))
        elif turn["role"] == "developer":
            out.append(USER + _instructions(turn))
        else:  # latest_reminder
            out.append(LATEST_REMINDER + _text(turn.get("content")))
        next_role = turns[i + 1]["role"] if i + 1 < len(turns) else None
        if turn["role"] in ("user", "developer") and next_role in (None, "assistant", "latest_reminder"):
            opens = settings.thinking and (not drop or i >= last_user)
            out.append(ASSISTANT + (THINK_OPEN if opens else THINK_CLOSE))
    return "".join(out)


def _last_user(turns: Sequence[Mapping[str, Any]]) -> int:
    return max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)


def render_completion(message: Mapping[str, Any], settings: PromptSettings = PromptSettings()) -> str:
    """The text a model writes for assistant `message` after the generation prompt:
    `[reasoning</think>]content[tool calls]<EOS>` — exactly what the prompt holds for that turn
    once the conversation goes on with tools (the warm-cache property)."""
    return _assistant(message, settings.thinking)


def wrap_file(path: str, text: str) -> str:
    """A file as the packer writes it: special tokens on both sides of the name and the
    content, so the content tokenizes the same alone as in any prompt."""
    return f"{FILE_NAME_BEGIN}{path}{FILE_NAME_END}{FILE_BEGIN}{text}{FILE_END}"


# ---- tokenizing ---------------------------------------------------------------------------
_SPLIT = re.compile("(" + "|".join(map(re.escape, SPLIT_TOKENS)) + ")")


def split_pieces(text: str) -> list[str]:
    """`text` cut before and after every split token: the pieces tokenize independently."""
    return [piece for piece in _SPLIT.split(text) if piece]


class TokenCache:
    """Token ids of text pieces keyed by a hash of their content (blake2b-128 of the UTF-8
    bytes); what is missing is tokenized in one parallel batch. Ids are stored as 32-bit
    arrays: a whole repository's worth stays small."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[bytes, array] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def encode_pieces(self, pieces: Sequence[str]) -> list[Sequence[int]]:
        """The ids of each piece (pieces must not straddle a split token)."""
        keys = [hashlib.blake2b(piece.encode(), digest_size=16).digest() for piece in pieces]
        missing = {key: piece for key, piece in zip(keys, pieces) if key not in self._ids}
        fresh = dict(zip(missing, self.tokenizer.encode_batch(list(missing.values())))) if missing else {}
        for key, ids in fresh.items():
            self._ids[key] = array("I", ids)
        # Fresh lists are returned as they are: extending a list from a list is 4x faster.
        return [fresh[key] if key in fresh else self._ids[key] for key in keys]


class PromptEncoder:
    """Messages -> token ids, incrementally.

    It remembers the last prompt: when the next one starts with it (a conversation with tools
    that got one more turn), only the new text is tokenized and appended to the kept ids.
    Anything else is re-encoded from the token cache, which tokenizes only pieces it has not
    seen before.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, settings: PromptSettings = PromptSettings(),
                 cache: TokenCache | None = None) -> None:
        if tokenizer is None:
            from runtime.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.settings = settings
        self.cache = cache if cache is not None else TokenCache(tokenizer)
        self._special_ids = {token: tokenizer.token_to_id(token) for token in SPLIT_TOKENS}
        self._last_text = ""
        self._last_ids: list[int] = []

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of `render_prompt(messages, self.settings)`."""
        text = render_prompt(messages, self.settings)
        # The kept ids are reusable only if the old prompt ends on a split token: the text
        # appended after it is then tokenized on its own in the whole prompt too.
        if self._last_text and text.startswith(self._last_text) and self._last_text.endswith(SPLIT_TOKENS):
            ids = self._last_ids + self.encode_text(text[len(self._last_text):])
        else:
            ids = self.encode_text(text)
        self._last_text, self._last_ids = text, ids
        return list(ids)  # a copy: callers may extend theirs with the completion

    def encode_text(self, text: str) -> list[int]:
        """Token ids of any text: split tokens mapped directly, the pieces between them
        through the cache."""
        pieces = split_pieces(text)
        plain = iter(self.cache.encode_pieces([p for p in pieces if p not in self._special_ids]))
        ids: list[int] = []
        for piece in pieces:
            special = self._special_ids.get(piece)
            if special is None:
                ids.extend(next(plain))
            else:
                ids.append(special)
        return ids
