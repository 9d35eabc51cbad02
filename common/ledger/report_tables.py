"""The report's tables and statements, shared by report.md and report.html."""

from __future__ import annotations

from fedtune.common.counts import counted
from fedtune.common.ledger.audit import AuditResult
from fedtune.common.ledger.report_facts import RECHECK, RunFacts


def guarantee_rows(facts: RunFacts) -> list[list[str]]:
    """One row per client: the statement an officer signs, and what it rests on."""
    def num(value, pattern=".4f"):
        return "-" if value is None else format(value, pattern)

    return [[c.client_id, num(c.epsilon), num(c.recomputed), num(c.target_epsilon, "g"), num(c.delta, "g"),
             c.unit, "-" if c.train_records is None else str(c.train_records), num(c.clipping_bound, "g"),
             num(c.noise_multiplier), num(c.sample_rate), f"{c.rounds_trained} / {c.steps}", c.accountant]
            for c in facts.clients]


GUARANTEE_HEADER = ["client", "ε (signed)", "ε (re-checked)", "ε budget", "δ", "unit of privacy (this client's)",
                    "train records", "clipping bound C", "σ (noise multiplier)", "q (sampling rate)",
                    "rounds / steps", "signed with"]


def round_rows(result: AuditResult) -> list[list[str]]:
    def num(v, p=".4f"):
        return "-" if v is None else format(v, p)

    return [[r.client_id, str(r.round), r.status, str(r.steps), num(r.noise_multiplier), num(r.sample_rate),
             num(r.claimed_epsilon), num(r.recomputed_epsilon), num(r.target_epsilon, "g"), num(r.delta, "g"),
             "ok" if not r.flags else ", ".join(r.flags)] for r in result.rows]


GUARANTEE_NOTE = ("Each guarantee is (ε, δ)-differential privacy for its unit: whether or not any one training "
                  "record of that client was used changes the probability of anything that client released by at "
                  "most a factor e^ε, plus δ. The federation's other clients do not change it.")
ROUND_HEADER = ["client", "round", "status", "steps", "σ", "q", "claimed ε", "recomputed ε", "budget", "δ", "check"]


def findings(result: AuditResult) -> list[str]:
    return ([f"FAIL: {p}" for p in result.problems] + [f"OVER BUDGET: {b}" for b in result.budget_exceeded]
            + [f"POLICY: {b}" for b in result.policy_breaches]
            + [f"rests on: {t}" for t in result.trust] + [f"note: {n}" for n in result.notes])


def run_lines(facts: RunFacts) -> list[str]:
    records = ", ".join(f"{c.client_id} {c.train_records if c.train_records is not None else '?'}"
                        for c in facts.clients)
    test = "not recorded" if facts.test_examples is None else f"{facts.test_examples} records (held by the server)"
    return [f"Run id: {facts.run_id}", f"Run: {facts.run_dates}", f"Report: {facts.report_date}",
            f"fedtune version: {facts.fedtune_version}", f"Task: {facts.task}, {counted(facts.rounds, 'round')}",
            f"Data: {'' if facts.data is None else facts.data + ' (config.toml); '}training records per client "
            f"(signed): {records}; test split: {test}",
            f"Signed by: each client's own accountant (column 'signed with'); re-checked by the audit: {RECHECK}"]
