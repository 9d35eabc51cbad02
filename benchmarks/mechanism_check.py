"""The mechanism check, measured: does the lower bound stay under the claim when the DP-SGD step
is honest, come close to it, and exceed it when the step is broken?

    python -m benchmarks.mechanism_check [--quick]

For sigma 0.5 and 1.0 at sample rate 0.05, with one-step trials (the check's default): the
honest step over five seeds (independent noise, sampling and split each), then three broken
steps injected through the check's test hook, never through a run flag: half the noise, no
clipping, and Poisson batches drawn at twice the recorded rate. Then ten-step trials (the claim
for ten composed steps), honest and at twice the rate. Each row is one `check_mechanism` on the
client's real trainer (`client.trainer.train_locally`), timed whole (model, steps, accountants,
statistics). Last, the statistics alone over many seeds, on scores drawn the way the measured
step makes them (N(1, sigma^2) when the canary is sampled, else N(0, sigma^2)): how often an
honest step raises a false alarm, and how often a doubled rate goes unseen. --quick: sigma 1.0,
one-step trials, one honest seed, a quarter of the trials, ten seeds of the statistics alone.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.harness import log, machine, markdown_table, publish, write_result

NAME = "mechanism_check"
SIGMAS = (0.5, 1.0)
SAMPLE_RATE, DELTA, TRIALS = 0.05, 1e-5, 1_000_000
HONEST_SEEDS = (0, 1, 2, 3, 4)
FAULT_CASES = ("half-noise", "no-clipping", "double-rate")
LONG_STEPS, LONG_TRIALS = 10, 400_000  # ten-step trials: 10x the DP steps per trial, so fewer trials
IDEAL_HONEST, IDEAL_DOUBLED = 1000, 100  # seeds of the statistics alone (about 0.2 s each)


def cases(*, quick: bool) -> list[tuple[float, int, str, int, int]]:
    """(sigma, steps per trial, case, seed, trials) of every check to run."""
    if quick:
        return [(1.0, 1, case, 0, TRIALS // 4) for case in ("honest", *FAULT_CASES)]
    rows = []
    for sigma in SIGMAS:
        rows += [(sigma, 1, "honest", seed, TRIALS) for seed in HONEST_SEEDS]
        rows += [(sigma, 1, fault, 0, TRIALS) for fault in FAULT_CASES]
    for sigma in SIGMAS:
        rows += [(sigma, LONG_STEPS, case, 0, LONG_TRIALS) for case in ("honest", "double-rate")]
    return rows


def measure(sigma: float, steps: int, case: str, seed: int, trials: int) -> dict:
    from fedtune.client.mechanism_check import check_mechanism

    fault = None if case == "honest" else case
    result = check_mechanism(noise_multiplier=sigma, sample_rate=SAMPLE_RATE, max_grad_norm=1.0, delta=DELTA,
                             steps=steps, trials=trials, seed=seed, fault=fault)
    log(result.describe())
    return {"sigma": sigma, "steps": steps, "case": case, "seed": seed, "claim_prv": result.claim_epsilon,
            "claim_pld": result.claim_epsilon_pld, "lower": result.lower_epsilon, "gdp": result.gdp_epsilon,
            "tightest_delta": result.tightest_delta, "tightest_claim": result.tightest_claim,
            "tightest_lower": result.tightest_lower, "tightness": result.tightness, "finding": result.finding,
            "measured_sigma": result.measured_sigma, "measured_rate": result.measured_rate,
            "tpr_low": result.rates.tpr_low, "fpr_high": result.rates.fpr_high,
            "trials_in": result.in_trials, "trials_out": result.out_trials,
            "dp_steps": result.dp_steps, "seconds": result.seconds}


def expected(row: dict) -> bool:
    """What the check must say: no finding for an honest step, a finding for a broken one."""
    return row["finding"] == (row["case"] != "honest")


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["sigma", "steps", "step code", "claimed ε (PRV / PLD) at δ 1e-5", "measured ε ≥ at δ 1e-5", "closest δ",
         "claimed ε there", "measured ε ≥ there", "measured / claimed", "noise σ, rate seen", "finding", "s"],
        [[f"{r['sigma']:g}", str(r["steps"]), r["case"] + (f" (seed {r['seed']})" if r["case"] == "honest" else ""),
          f"{r['claim_prv']:.2f} / {r['claim_pld']:.2f}", f"{r['lower']:.2f}", f"{r['tightest_delta']:.0e}",
          f"{r['tightest_claim']:.3f}", f"{r['tightest_lower']:.3f}", f"{r['tightness']:.2f}x",
          f"{r['measured_sigma']:.3f}, {r['measured_rate']:.4f}",
          ("**yes**" if r["finding"] else "no") + ("" if expected(r) else " (WRONG)"), f"{r['seconds']:.0f}"]
         for r in rows])


def ideal(sigma: float, case: str, seeds: int) -> dict:
    """The check's statistics on `seeds` independent draws of ideal one-step scores."""
    from fedtune.client.mechanism_stats import bound_rates, claim_profile, trial_statistic

    profile = claim_profile(noise_multiplier=sigma, sample_rate=SAMPLE_RATE, steps=1, delta=DELTA)
    rate = SAMPLE_RATE * (2 if case == "double-rate" else 1)
    ratios = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        inside = (rng.random((TRIALS, 1)) < rate) + sigma * rng.standard_normal((TRIALS, 1))
        outside = sigma * rng.standard_normal((TRIALS, 1))
        rates = bound_rates(inside=trial_statistic(inside, noise_multiplier=sigma, sample_rate=SAMPLE_RATE),
                            outside=trial_statistic(outside, noise_multiplier=sigma, sample_rate=SAMPLE_RATE),
                            profile=profile, rng=rng)
        ratios.append(max(rates.epsilon(d) / max(c, 1e-12) for d, c in zip(profile.deltas, profile.epsilons)))
    log(f"ideal scores, sigma {sigma:g}, {case}: {sum(r > 1 for r in ratios)} findings in {seeds}")
    return {"sigma": sigma, "case": case, "seeds": seeds, "findings": int(sum(r > 1 for r in ratios)),
            "under_half": int(sum(r < 0.5 for r in ratios)), "ratio_min": min(ratios),
            "ratio_median": float(np.median(ratios)), "ratio_max": max(ratios)}


def ideal_table(rows: list[dict]) -> str:
    return markdown_table(
        ["sigma", "step", "checks (seeds)", "findings", "under half the claim",
         "measured / claimed, closest δ: min / median / max"],
        [[f"{r['sigma']:g}", r["case"], str(r["seeds"]), str(r["findings"]), str(r["under_half"]),
          f"{r['ratio_min']:.2f} / {r['ratio_median']:.2f} / {r['ratio_max']:.2f}"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = [measure(*case) for case in cases(quick=args.quick)]
    command = "python -m benchmarks.mechanism_check" + (" --quick" if args.quick else "")
    setup = (f"sample rate {SAMPLE_RATE}, delta {DELTA:g}, clipping bound 1, 95% confidence; "
             f"{TRIALS // 4 if args.quick else TRIALS:,} canary-in trials wanted per one-step check"
             + ("" if args.quick else f", {LONG_TRIALS:,} per {LONG_STEPS}-step check"))
    honest, doubled = (10, 10) if args.quick else (IDEAL_HONEST, IDEAL_DOUBLED)
    ideal_rows = [ideal(sigma, case, seeds) for sigma in ((1.0,) if args.quick else SIGMAS)
                  for case, seeds in (("honest", honest), ("double-rate", doubled))]
    result = {"rows": rows, "ideal": ideal_rows, "setup": setup, "command": command,
              "all_as_expected": all(map(expected, rows)), "max_seconds": max(r["seconds"] for r in rows)}
    write_result(NAME, result, quick=args.quick)
    publish(NAME, f"Machine: {machine()}. Setup: {setup}. Command: `{command}`.\n\n{table(rows)}\n\n"
                  f"Every check as expected: **{'yes' if result['all_as_expected'] else 'NO'}**; slowest check "
                  f"{result['max_seconds']:.0f} s.\n\nThe statistics alone, one-step trials, {TRIALS:,} a world, "
                  f"on ideal scores:\n\n{ideal_table(ideal_rows)}", quick=args.quick)


if __name__ == "__main__":
    main()
