"""Step-load mode: the same users, with `--step-users` more sync and polling users every
`--step-duration-s` (the webhook, bad-input and burst users stay one each throughout), until a
step misses the SLO (failure ratio or a p95 over the step's window) or `--step-max-users`
sync and polling users are reached. The summary's `steps` list each step's figures; the answer
is the highest requests/s of a step that kept the SLO (`python -m loadtests.slo` prints it).

    python -m loadtests.run --step --step-users 2 --step-duration-s 60 --step-max-users 16
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `locust -f loadtests/stepload.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locust import LoadTestShape  # noqa: E402

from loadtests import locustfile  # noqa: E402
from loadtests.locustfile import (  # noqa: E402, F401  (locust collects the user classes here)
    BadInputUser,
    BurstUser,
    PollingUser,
    SyncUser,
    WebhookUser,
)


class StepLoadShape(LoadTestShape):
    def tick(self):
        state = locustfile.STATE
        options = self.runner.environment.parsed_options
        state.step_mode = True
        if state.stop_stepping:
            return None
        index = int(self.get_run_time() // options.step_duration_s)
        judged = {step["step"] for step in state.steps}
        if index > 0 and index - 1 not in judged:
            users = locustfile.users_at_step(index - 1, options)
            verdict = locustfile.judge_step(index - 1, users, self.runner.environment)
            state.steps.append(verdict)
            last = options.step_users * index >= options.step_max_users
            if not verdict["within_slo"] or last:
                state.stop_stepping = True
                return None
        # spawn the step's new users within a few seconds, inside the unmeasured warm-up
        return locustfile.users_at_step(index, options), max(1.0, options.step_users / 2)
