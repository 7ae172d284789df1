"""The official side of tests/test_evals_harbor.py: run inside a Python 3.13 root where harbor
0.26.0 and terminal-bench 0.2.18 are installed (both need Python >= 3.12; the project runs on
3.11), it reads cases as JSON on stdin and prints what the official code makes of each.

Cases (paths relative to this file's folder):
- rewards {dir}: harbor's Verifier reading a trial whose verifier folder is `dir`: its own
  _parse_reward_json / _parse_reward_text and VerifierResult; which file wins is the three
  lines of Verifier.verify that choose, restated here (verify itself needs a live environment);
  `valid` is TrialResult.reward_valid's rule with harbor's own error policy table.
- mean {rewards}: harbor.metrics.mean.Mean().compute.
- task {dir}: harbor.models.task.task.Task(dir) and its TaskConfig.
- atif {trajectory}: harbor.utils.trajectory_validator.TrajectoryValidator().validate.
- tb1 {output}: terminal-bench's PytestParser().parse and Harness._is_resolved.

terminal-bench is installed without its dependencies: its package __init__ imports the whole
harness (boto3, litellm, streamlit: a gigabyte), so the package is registered without running
__init__ (the parsers need only the standard library), and _is_resolved is compiled alone from
harness.py's own source.
"""

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).parent

spec = importlib.util.find_spec("terminal_bench")
package = types.ModuleType("terminal_bench")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["terminal_bench"] = package

from harbor.metrics.mean import Mean  # noqa: E402
from harbor.models.task.task import Task  # noqa: E402
from harbor.models.trial.error_policy import policy_for  # noqa: E402
from harbor.models.trial.paths import TrialPaths  # noqa: E402
from harbor.models.verifier.result import VerifierResult  # noqa: E402
from harbor.utils.trajectory_validator import TrajectoryValidator  # noqa: E402
from harbor.verifier.verifier import RewardFileNotFoundError, Verifier  # noqa: E402
from terminal_bench.parsers.base_parser import UnitTestStatus  # noqa: E402
from terminal_bench.parsers.pytest_parser import PytestParser  # noqa: E402

harness = ast.parse(Path(package.__path__[0], "harness", "harness.py").read_text())
function = next(n for n in ast.walk(harness) if isinstance(n, ast.FunctionDef) and n.name == "_is_resolved")
scope = {"UnitTestStatus": UnitTestStatus}
exec(compile(ast.Module([function], []), "terminal_bench/harness/harness.py", "exec"), scope)
is_resolved = scope["_is_resolved"]


def rewards(case):
    verifier = Verifier.__new__(Verifier)
    verifier.trial_paths = TrialPaths(HERE / case["dir"])
    try:
        if verifier.trial_paths.reward_json_path.exists():
            found = verifier._parse_reward_json()
        elif verifier.trial_paths.reward_text_path.exists():
            found = verifier._parse_reward_text()
        else:
            raise RewardFileNotFoundError("no reward file")
        result = VerifierResult(rewards=found).rewards
    except Exception as e:  # the trial's exception, by type name as harbor records it
        return {"error": type(e).__name__, "valid": False}
    return {"rewards": result, "valid": bool(result)}


def task(case):
    try:
        found = Task(HERE / case["dir"])
    except Exception as e:
        return {"error": type(e).__name__}
    config = found.config
    return {"instruction": found.instruction, "agent_timeout": config.agent.timeout_sec,
            "verifier_timeout": config.verifier.timeout_sec, "build_timeout": config.environment.build_timeout_sec,
            "workdir": config.environment.workdir, "docker_image": config.environment.docker_image,
            "environment_env": config.environment.env, "verifier_env": config.verifier.env,
            "solution_env": config.solution.env}


def atif(case):
    validator = TrajectoryValidator()
    return {"valid": validator.validate(case["trajectory"]), "errors": validator.get_errors()}


def tb1(case):
    try:
        results = PytestParser().parse(case["output"])
    except Exception as e:
        return {"results": None, "error": type(e).__name__, "resolved": bool(is_resolved(None, None))}
    return {"results": {name: status == UnitTestStatus.PASSED for name, status in results.items()},
            "resolved": bool(is_resolved(None, results))}


KINDS = {"rewards": rewards, "mean": lambda case: Mean().compute(case["rewards"]), "task": task, "atif": atif,
         "tb1": tb1, "policy": lambda case: {"valid": policy_for(case["type"]).has_valid_reward}}
print(json.dumps([KINDS[case["kind"]](case) for case in json.load(sys.stdin)]))
