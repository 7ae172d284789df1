import json
import sys

sys.path.insert(0, "/app")
from stats import median  # noqa: E402

checks = {
    "odd": lambda: median([3, 1, 2]) == 2,
    "even": lambda: median([4, 1, 3, 2]) == 2.5,
    "single": lambda: median([7]) == 7,
}
rewards = {}
for name, check in checks.items():
    try:
        rewards[name] = 1.0 if check() else 0.0
    except Exception:
        rewards[name] = 0.0
print(rewards)
# One key, as Harbor's Mean metric wants for one number per run: with other keys it would
# average each key over the run's trials, counting 0 where a trial lacks it.
with open("/logs/verifier/reward.json", "w") as out:
    json.dump({"reward": min(rewards.values())}, out)
