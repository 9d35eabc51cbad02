"""An early stop, checked against what was signed: the coordinator holds its own key, so a stop it
claims must follow from the scores and patience it signed, end the ledger, and come before every
round an institution signed."""

from __future__ import annotations

from typing import Any

from fedtune.common.counts import counted

STOP = "stopped_early"
PATIENCE = "early_stopping_patience"


def early_stop_problems(rounds: list[dict[str, Any]], clients: dict[str, list[dict[str, Any]]],
                        run_id: str | None) -> list[str]:
    """What is wrong with the early stop the server's round records claim ([] if none is claimed)."""
    stops = [index for index, record in enumerate(rounds) if STOP in record]
    if not stops:
        return []
    if stops != [len(rounds) - 1]:
        return [f"the server ledger claims an early stop at round(s) "
                f"{', '.join(str(rounds[i].get('round')) for i in stops)}, not only at its last round"]
    problems = _rule_problems(rounds)
    last = rounds[-1].get("round")
    for owner, records in sorted(clients.items()):
        later = sorted({r.get("round") for r in records if r.get("run_id") == run_id and r.get("request", "fit") == "fit"
                        and isinstance(r.get("round"), int) and isinstance(last, int) and r["round"] > last})
        if later:
            problems.append(f"{owner} signed round(s) {', '.join(map(str, later))} of this run after the server's "
                            f"early stop at round {last}: server records were removed")
    return problems


def _rule_problems(rounds: list[dict[str, Any]]) -> list[str]:
    """The stop must follow from the signed validation scores and the signed patience."""
    patience = rounds[-1].get(PATIENCE)
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        return ["the server's early stop names no early-stopping-patience of 1 or more"]
    keys = [key for key in rounds[-1] if key.startswith("validation_")]
    scores = [record.get(keys[0]) if keys else None for record in rounds]
    if not keys or any(not isinstance(s, (int, float)) for s in scores):
        return ["the server's early stop is not backed by a signed validation score for every round"]
    best_round = max(range(len(scores)), key=lambda i: (scores[i], -i)) + 1  # the first round with the best score
    if len(rounds) - best_round < patience:
        return [f"the server stopped early after round {len(rounds)}, but its signed validation scores last "
                f"improved at round {best_round}, fewer than its patience of {counted(patience, 'round')} before"]
    return []
