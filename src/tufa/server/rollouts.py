"""Staged rollouts: a wave that advances stage by stage by itself, guarded by its
devices' health (ADR 0019).

`start` serves the first stage at once; the server's background task (`advance_all`,
run by the process holding the background lock) then looks at every running plan:
a breach of the health gate halts it, with the reason; a stage that has soaked with
the gate holding makes way for the next, and after the last stage the wave is
completed. The plan and its progress are rows (`wave_plans`, `wave_devices`), so a
restart or another replica carries on where the last one stopped; each step runs
under the production channel's lock and reads the plan again first, so two processes
stepping the same plan at once step it once.

What is released stays the owner's decision: the wave's targets are signed offline
before any of this, and a plan only chooses which of the tag's devices see them.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Final, TypedDict

from sqlalchemy import Connection

from tufa.core.metadata import Channel
from tufa.server import devices
from tufa.server.exceptions import Conflict, InvalidInput
from tufa.server.rollout_health import breach, conditions, stage_heard, tally
from tufa.server.rollout_plans import (
    ADVANCING,
    HALTED,
    RUNNING,
    SOAKING,
    HealthRules,
    Plan,
    Stage,
    add_plan,
    change_plan,
    find_plan,
    running_plans,
    wave_device_ids,
)
from tufa.server.state import ServerState
from tufa.server.views import wave_view
from tufa.server.waves import ACTIVE, Waves
from tufa.server.webhooks import emit

log = logging.getLogger("tufa.server")
PROD: Final = Channel.PROD


class PlannedStage(TypedDict):
    stage: int
    target: str
    devices_in_all: int
    devices_new: int


class PlanPreview(TypedDict):
    """What `--plan` would do with the fleet as it is now (`--dry-run`), or did at once."""

    wave: str
    devices_of_tag: int
    stages: list[PlannedStage]
    dry_run: bool


class Rollouts:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.waves = Waves(state)

    def _now(self) -> datetime:
        return self.state.settings.clock.now()

    def start(
        self,
        conn: Connection,
        factory_id: int,
        name: str,
        stages: list[Stage],
        rules: HealthRules,
        dry_run: bool,
    ) -> PlanPreview:
        """Store the plan and serve its first stage; a dry run only shows the stages."""
        rules.check()
        self.state.db.lock_channel(conn, factory_id, PROD)
        row = self.waves.row(conn, factory_id, name)
        if row.status != ACTIVE:
            raise Conflict(f"wave {name!r} is {row.status}; only an active wave rolls out")
        if find_plan(conn, factory_id, name) is not None:
            raise Conflict(
                f"wave {name!r} has a staged plan already; `tufa waves status {name}` shows it"
            )
        self.waves.require_signed(conn, factory_id, row)
        preview = self._preview(conn, factory_id, row, stages, dry_run)
        first = preview["stages"][0]["devices_in_all"]
        if first < rules.min_reports:
            raise InvalidInput(
                f"the first stage ({stages[0].label}) serves {first} device(s), fewer than "
                f"--min-reports {rules.min_reports}: the health gate could never decide; "
                "lower --min-reports or make the first stage larger"
            )
        if dry_run:
            return preview
        self._adopt_earlier_rollouts(conn, factory_id, row)
        add_plan(conn, factory_id, name, stages, rules, self._now())
        self._serve_stage(conn, factory_id, row, stages, 0)
        return preview

    def _preview(
        self, conn: Connection, factory_id: int, row: Any, stages: list[Stage], dry_run: bool
    ) -> PlanPreview:
        of_tag = devices.production_count(conn, factory_id, row.tag)
        group = stages[0].group
        group_size = 0 if group is None else len(self._candidates(conn, factory_id, row, group))
        served = len(devices.served_ids(conn, factory_id, wave_view(row.name)))
        planned: list[PlannedStage] = []
        for index, stage in enumerate(stages):
            wanted = stage.devices_in_all(of_tag, served + group_size)
            if index and wanted < planned[-1]["devices_in_all"]:
                raise InvalidInput(
                    f"field 'plan': stage {stage.label} must be larger than stage "
                    f"{stages[index - 1].label}: stages count the devices served in all "
                    f"({wanted} after {planned[-1]['devices_in_all']} of {of_tag})"
                )
            in_all = max(served, wanted)
            planned.append(
                {
                    "stage": index + 1,
                    "target": stage.label,
                    "devices_in_all": in_all,
                    "devices_new": in_all - served,
                }
            )
            served = in_all
        return {"wave": row.name, "devices_of_tag": of_tag, "stages": planned, "dry_run": dry_run}

    def _candidates(
        self, conn: Connection, factory_id: int, row: Any, group: str | None
    ) -> list[str]:
        found = devices.production_devices(
            conn, factory_id, row.tag, not_in_view=wave_view(row.name), group=group, idents=None
        )
        return [d.id for d in found]

    def _adopt_earlier_rollouts(self, conn: Connection, factory_id: int, row: Any) -> None:
        """Devices served the wave before it had a plan join the gate's population."""
        recorded = wave_device_ids(conn, factory_id, row.name)
        earlier = devices.served_ids(conn, factory_id, wave_view(row.name)) - recorded
        self.waves.serve(conn, factory_id, row, sorted(earlier), stage=None, publish=False)

    def _serve_stage(
        self, conn: Connection, factory_id: int, row: Any, stages: list[Stage], index: int
    ) -> int:
        """Serve stage `index`: the devices it adds to those served so far."""
        stage = stages[index]
        of_tag = devices.production_count(conn, factory_id, row.tag)
        served = len(devices.served_ids(conn, factory_id, wave_view(row.name)))
        if stage.group is not None:
            chosen = self._candidates(conn, factory_id, row, stage.group)
        else:
            wanted = stage.devices_in_all(of_tag, 0) - served
            chosen = self._candidates(conn, factory_id, row, None)[: max(wanted, 0)]
        self.waves.serve(conn, factory_id, row, chosen, stage=index)
        return len(chosen)

    def resume(self, conn: Connection, factory_id: int, name: str) -> None:
        """Go on after a halt: the current stage soaks again, and the gate counts the
        failures reported from now on (the operator has looked at the earlier ones)."""
        self.state.db.lock_channel(conn, factory_id, PROD)
        self.waves.row(conn, factory_id, name)
        plan = find_plan(conn, factory_id, name)
        if plan is None:
            raise Conflict(
                f"wave {name!r} has no staged plan; `tufa waves rollout --plan` starts one"
            )
        if plan.state != HALTED:
            raise Conflict(f"wave {name!r} is {plan.state}; only a halted rollout resumes")
        now = self._now()
        change_plan(
            conn,
            factory_id,
            name,
            state=SOAKING,
            stage_started_at=now,
            gate_since=now,
            halt_reason=None,
            halted_at=None,
        )
        log.info("staged rollout of wave %s resumed at stage %d", name, plan.stage + 1)

    # -- the background task --------------------------------------------------------

    def advance_all(self) -> None:
        """One look at every running plan, each in its own transaction."""
        with self.state.db.read() as conn:
            running = running_plans(conn)
        for factory_id, name in running:
            try:
                with self.state.db.write() as conn:
                    self._step(conn, factory_id, name)
            except Exception:
                log.exception("staged rollout of wave %s: this step failed; trying again", name)

    def _step(self, conn: Connection, factory_id: int, name: str) -> None:
        """Halt the plan, serve its next stage, complete its wave, or leave it."""
        self.state.db.lock_channel(conn, factory_id, PROD)
        plan = find_plan(conn, factory_id, name)
        row = self.waves.row(conn, factory_id, name, required=False)
        if plan is None or plan.state not in RUNNING or row is None or row.status != ACTIVE:
            return
        now = self._now()
        total, per_stage = tally(conditions(conn, factory_id, name, row.version, plan, now))
        reason = breach(total, plan)
        if reason is not None:
            change_plan(conn, factory_id, name, state=HALTED, halt_reason=reason, halted_at=now)
            emit(
                conn,
                factory_id,
                "wave.halted",
                {
                    **_about(row),
                    "stage": plan.stage + 1,
                    "reason": reason,
                    "reports": total.reports,
                    "failures": total.failures,
                },
            )
            log.warning(
                "staged rollout of wave %s halted at stage %d: %s", name, plan.stage + 1, reason
            )
            return
        if now < plan.soaked_at:
            return
        if total.reports < plan.rules.min_reports or not stage_heard(per_stage, plan):
            if plan.state != ADVANCING:
                change_plan(conn, factory_id, name, state=ADVANCING)
            return
        if plan.at_last_stage:
            self.waves.complete(conn, factory_id, name)
            log.info("staged rollout of wave %s completed", name)
            return
        self._advance(conn, factory_id, row, plan, now)

    def _advance(
        self, conn: Connection, factory_id: int, row: Any, plan: Plan, now: datetime
    ) -> None:
        index = plan.stage + 1
        added = self._serve_stage(conn, factory_id, row, plan.stages, index)
        change_plan(conn, factory_id, row.name, stage=index, stage_started_at=now, state=SOAKING)
        data = {**_about(row), "stage": index + 1, "target": plan.stages[index].label}
        emit(conn, factory_id, "wave.advanced", {**data, "devices_added": added})
        log.info(
            "staged rollout of wave %s advanced to stage %d (%s): %d more device(s)",
            row.name,
            index + 1,
            plan.stages[index].label,
            added,
        )


def _about(row: Any) -> dict[str, Any]:
    """What every wave event says of its wave."""
    return {"wave": row.name, "tag": row.tag, "version": row.version}
