"""The SLO check: thresholds from a YAML file against a run's summary JSON.

    python -m loadtests.slo loadtests/reports/<run>/summary.json [--slo loadtests/slo.yaml]

prints every threshold with its measured value and exits 1 naming each one that failed (2 when
the summary or the SLO file cannot be read). A step-load summary also gets its answer: the
highest requests/s of a step that kept the per-step thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SLO = Path(__file__).with_name("slo.yaml")
KNOWN_KEYS = {
    "failure_ratio_max",
    "p95_ms",
    "webhook_delivery_ratio_min",
    "every_accepted_job_finishes",
    "jobs_failed_max",
    "ledger_matches_deliveries",
    "step_load",
}


@dataclass(frozen=True)
class Check:
    """One threshold's verdict. `ok` is None when the run has nothing to judge it on."""

    name: str
    ok: bool | None
    measured: Any
    threshold: Any
    detail: str = ""

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        text = f"{verdict}  {self.name}: measured {self.measured}, threshold {self.threshold}"
        return f"{text} ({self.detail})" if self.detail else text


def load_slo(path: str | Path = DEFAULT_SLO) -> dict[str, Any]:
    slo = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(slo) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown SLO keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    return slo


def traffic_checks(
    endpoints: dict[str, dict], slo: dict[str, Any], *, unmeasured_fails: bool = False
) -> list[Check]:
    """Failure ratio and p95 per endpoint: the thresholds a step of a step-load run is held to.
    An endpoint without requests is skipped in a step; over a whole run (`unmeasured_fails`)
    it fails, since every user class sends its requests in every run."""
    checks = []
    requests = sum(e["requests"] for e in endpoints.values())
    failures = sum(e["failures"] for e in endpoints.values())
    if "failure_ratio_max" in slo:
        limit = float(slo["failure_ratio_max"])
        ratio = failures / requests if requests else 0.0
        checks.append(
            Check(
                "failure_ratio_max",
                ratio <= limit if requests else (False if unmeasured_fails else None),
                round(ratio, 5),
                limit,
                f"{failures} of {requests} requests",
            )
        )
    for name, limit in (slo.get("p95_ms") or {}).items():
        entry = endpoints.get(name)
        if not entry or not entry["requests"]:
            verdict = False if unmeasured_fails else None
            checks.append(Check(f"p95_ms[{name}]", verdict, None, limit, "no requests"))
            continue
        p95 = entry["p95_ms"]
        checks.append(Check(f"p95_ms[{name}]", p95 <= float(limit), p95, limit))
    return checks


def evaluate(summary: dict[str, Any], slo: dict[str, Any]) -> list[Check]:
    """Every threshold of `slo` against a whole run's summary. A run that measured nothing,
    or whose load-test tasks raised, fails: it cannot show that the service kept the SLO."""
    crashes = summary.get("task_errors") or []
    checks = [
        Check(
            "load test tasks ran cleanly",
            not crashes,
            f"{sum(c['occurrences'] for c in crashes)} task errors",
            "0 task errors",
            "; ".join(f"{c['occurrences']}x {c['error']}" for c in crashes[:3]),
        )
    ]
    checks += traffic_checks(summary.get("endpoints") or {}, slo, unmeasured_fails=True)
    if "webhook_delivery_ratio_min" in slo:
        hooks = summary.get("webhooks") or {}
        limit = float(slo["webhook_delivery_ratio_min"])
        expected = hooks.get("expected", 0)
        ratio = hooks.get("ratio")
        unreadable = hooks.get("unreadable", 0)
        checks.append(
            Check(
                "webhook_delivery_ratio_min",
                bool(expected) and ratio >= limit and not unreadable,
                ratio,
                limit,
                f"{hooks.get('delivered', 0)} of {expected} webhooks delivered"
                + (f", {hooks['bad_payloads']} bad payloads" if hooks.get("bad_payloads") else "")
                + (f", {unreadable} unreadable" if unreadable else "")
                + ("" if expected else "; no webhook job was accepted"),
            )
        )
    if slo.get("every_accepted_job_finishes"):
        jobs = summary.get("jobs") or {}
        unfinished = jobs.get("unfinished", 0)
        checks.append(
            Check(
                "every_accepted_job_finishes",
                unfinished == 0 and bool(jobs.get("accepted")),
                f"{unfinished} unfinished",
                "0 unfinished",
                f"{jobs.get('accepted', 0)} accepted, {jobs.get('success', 0)} success, "
                f"{jobs.get('failed', 0)} failed"
                + (f"; unfinished ids {jobs.get('unfinished_ids')}" if unfinished else ""),
            )
        )
    if "jobs_failed_max" in slo:
        jobs = summary.get("jobs") or {}
        limit = int(slo["jobs_failed_max"])
        failed = jobs.get("failed", 0)
        checks.append(
            Check(
                "jobs_failed_max",
                failed <= limit,
                failed,
                limit,
                f"{failed} of {jobs.get('accepted', 0)} accepted jobs ended failed (refunded)",
            )
        )
    if slo.get("ledger_matches_deliveries"):
        ledger = summary.get("ledger")
        if ledger is None:
            checks.append(
                Check("ledger_matches_deliveries", None, None, True, "no database access")
            )
        else:
            checks.append(
                Check(
                    "ledger_matches_deliveries",
                    not ledger["problems"],
                    f"{ledger['ledger_images']} images in the ledger",
                    f"{ledger['delivered_images']} delivered",
                    "; ".join(ledger["problems"]),
                )
            )
    return checks


def best_step(steps: list[dict[str, Any]], slo: dict[str, Any]) -> dict[str, Any] | None:
    """The step-load answer: the step with the highest requests/s among those that passed."""
    passing = [step for step in steps if step.get("within_slo")]
    return max(passing, key=lambda step: step["rps"], default=None)


def report(summary: dict[str, Any], slo: dict[str, Any]) -> tuple[list[Check], list[str]]:
    """Checks and printable lines (including the step-load answer)."""
    checks = evaluate(summary, slo)
    lines = [check.line() for check in checks]
    steps = summary.get("steps")
    if steps:
        lines.append("")
        lines.append("step load (per-step thresholds: failure ratio and p95 per endpoint):")
        for step in steps:
            verdict = (
                "within SLO" if step["within_slo"] else "OUTSIDE SLO: " + ", ".join(step["failed"])
            )
            lines.append(
                f"  {step['users']:>4} users  {step['rps']:>8.2f} req/s  "
                f"{step['images_per_s']:>7.2f} images/s  {verdict}"
            )
        best = best_step(steps, slo)
        if best is None:
            lines.append("highest sustained RPS within the SLO: none (the first step failed)")
        else:
            lines.append(
                f"highest sustained RPS within the SLO: {best['rps']:.2f} req/s "
                f"({best['images_per_s']:.2f} images/s) at {best['users']} users"
            )
            if all(step["within_slo"] for step in steps):
                lines.append(
                    "  every step kept the SLO: this is a lower bound, raise --step-max-users"
                )
    return checks, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.slo", description=__doc__)
    parser.add_argument("summary", type=Path, help="summary.json of a run")
    parser.add_argument("--slo", type=Path, default=DEFAULT_SLO, help="SLO YAML")
    args = parser.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text())
        slo = load_slo(args.slo)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cannot check the SLO: {exc}", file=sys.stderr)
        return 2
    checks, lines = report(summary, slo)
    print(f"SLO {args.slo} against {args.summary}:")
    print("\n".join(lines))
    failed = [check.name for check in checks if check.ok is False]
    if failed:
        print(f"SLO FAILED: {', '.join(failed)}")
        return 1
    print("SLO met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
