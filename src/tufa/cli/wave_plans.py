"""`tufa waves rollout --plan` and `tufa waves status`: staged rollouts as the CLI shows
them (the server runs them: server/rollouts.py)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import click

from tufa.cli.client import Api
from tufa.cli.output import print_json
from tufa.core import api_paths

_PERCENT = re.compile(r"\s*([0-9]{1,3}(?:\.[0-9]{1,6})?)\s*%?\s*")


def percentage(text: str) -> str:
    """`--max-failure-rate 5%` (or `5`): a share from 0% to 100%, as the server takes it."""
    match = _PERCENT.fullmatch(text)
    if match is None or not 0 <= float(match.group(1)) <= 100:
        raise click.BadParameter(f"{text!r} is not a percentage from 0 to 100, such as 5%")
    return f"{match.group(1)}%"


def staged_rollout(
    api: Api,
    name: str,
    plan: str,
    rules: dict[str, Any],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Start the plan (or, with `dry_run`, show its stages with the fleet as it is)."""
    body: dict[str, Any] = {
        "plan": [stage.strip() for stage in plan.split(",")],
        "dry_run": dry_run,
    }
    for key, value in rules.items():
        if isinstance(value, timedelta):
            body[f"{key}_seconds"] = int(value.total_seconds())
        elif value is not None:
            body[key] = value
    preview = api.request(
        "POST", api.path(api_paths.WAVE_ROLLOUT, name=name), json_body=body
    ).json()
    if as_json:
        print_json(preview)
        return
    click.echo(
        f"{'Would roll out' if dry_run else 'Rolling out'} wave {name} in "
        f"{len(preview['stages'])} stage(s), of {preview['devices_of_tag']} device(s) of its tag:"
    )
    for stage in preview["stages"]:
        click.echo(
            f"  stage {stage['stage']} ({stage['target']}): {stage['devices_new']} more, "
            f"{stage['devices_in_all']} in all"
        )
    if not dry_run:
        click.echo(
            "Stage 1 is served now; the server goes on by itself while the health gate "
            f"holds. Follow it with `tufa waves status {name}`."
        )


def status_row(wave: dict[str, Any]) -> dict[str, Any]:
    """What `tufa waves status --json` prints of a wave: its counts, and its plan's
    state, stage, halt reason and per-stage counts."""
    rollout = wave.get("rollout")
    row = {
        key: wave[key]
        for key in (
            "name",
            "status",
            "devices_served",
            "devices_of_tag",
            "devices_installed",
            "devices_failed",
            "devices_stale",
        )
    }
    if rollout is None:
        return {**row, "state": wave["status"], "stage": None, "halt_reason": None, "plan": None}
    return {
        **row,
        "state": rollout["state"],
        "stage": rollout["stage"],
        "halt_reason": rollout["halt_reason"],
        "plan": rollout,
    }


def echo_status(row: dict[str, Any]) -> None:
    click.echo(
        f"{row['name']} ({row['status']}): served to {row['devices_served']} of "
        f"{row['devices_of_tag']} device(s) of its tag; installed on "
        f"{row['devices_installed']}, failed on {row['devices_failed']}"
    )
    if row["devices_stale"]:
        click.echo(
            f"  {row['devices_stale']} of them fed old metadata (stale): "
            "`tufa devices list --stale` names them"
        )
    plan = row["plan"]
    if plan is None:
        return
    gate = plan["gate"]
    click.echo(
        f"  staged rollout: {plan['state']} at stage {plan['stage']} of {len(plan['stages'])}"
        + (f", next stage at {plan['next_stage_at']}" if plan["next_stage_at"] else "")
    )
    click.echo(
        f"  health gate: {gate['failures']} failure(s) of {gate['reports']} report(s) "
        f"({gate['failure_rate']:g}%), halts above {gate['max_failure_rate']:g}%"
        + ("" if gate["decides"] else f"; decides from {gate['min_reports']} reports")
    )
    if plan["devices_before_plan"]:
        click.echo(
            f"  {plan['devices_before_plan']} device(s) served before the plan started "
            "count in the gate too"
        )
    if plan["halt_reason"]:
        click.echo(f"  halted at {plan['halted_at']}: {plan['halt_reason']}")
        click.echo(
            f"  look at the failed devices, then `tufa waves resume {row['name']}` "
            f"or `tufa waves cancel {row['name']}`"
        )
    click.echo("  stage  target  served  installed  failed  silent  stale")
    for stage in plan["stages"]:
        click.echo(
            f"  {stage['stage']:>5}  {stage['target']:>6}  {stage['devices_served']:>6}  "
            f"{stage['devices_installed']:>9}  {stage['devices_failed']:>6}  "
            f"{stage['devices_silent']:>6}  {stage['devices_stale']:>5}"
        )
