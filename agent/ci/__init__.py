"""CI jobs that turn an issue into a pull request (docs/ci.md).

- `events`: which GitHub Actions events ask v4agent for work, from whom, and what they ask;
- `github`: the few GitHub REST calls v4agent makes (githubkit underneath);
- `remote`: git over HTTPS with the token, from v4agent's own process only;
- `progress`: the one comment that says how a run goes;
- `pull`: branch names and pull request text from untrusted text, and publishing a commit as a
  pull request.

`v4agent ci github` (agent/cli/ci.py) and `v4agent fix --pr` (agent/cli/fix.py) put them together.
"""

from __future__ import annotations

# Every branch v4agent pushes starts with this; it pushes no other ref.
BRANCH_PREFIX = "v4agent/"
