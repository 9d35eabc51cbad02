"""A client's privacy state, kept in its Flower node state so it survives between rounds.

The plan (sigma, sample rate, steps per round) is fixed the first time the client is asked to
train and never recalibrated; the accountant history grows by one entry per trained round.
"""

from __future__ import annotations

from dataclasses import asdict

from flwr.app import ConfigRecord, RecordDict

from common.privacy import HistoryEntry, PrivacyPlan

STATE_KEY = "fedtune.privacy"


def load_privacy_state(state: RecordDict) -> tuple[PrivacyPlan | None, list[HistoryEntry]]:
    record = state.config_records.get(STATE_KEY)
    if record is None:
        return None, []
    plan = PrivacyPlan(**{k: record[k] for k in PrivacyPlan.__dataclass_fields__})
    history = [(float(s), float(q), int(n)) for s, q, n in
               zip(record["history-noise"], record["history-rate"], record["history-steps"], strict=True)]
    return plan, history


def save_privacy_state(state: RecordDict, *, plan: PrivacyPlan, history: list[HistoryEntry]) -> None:
    record = ConfigRecord(asdict(plan))
    record["history-noise"] = [float(s) for s, _, _ in history]
    record["history-rate"] = [float(q) for _, q, _ in history]
    record["history-steps"] = [int(n) for _, _, n in history]
    state.config_records[STATE_KEY] = record
