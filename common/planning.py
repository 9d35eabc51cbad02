"""`fedtune plan`: the privacy schedule a client will follow, from the client's own code."""

from __future__ import annotations

from pathlib import Path

from common.privacy import compose, epsilon_of, plan_privacy


def privacy_schedule(*, dataset_size: int, batch_size: int, local_epochs: int, rounds: int,
                     target_epsilon: float, delta: float, accountant: str = "prv",
                     noise_multiplier: float = 0.0) -> dict:
    """Noise multiplier and epsilon after each round, via the same plan and composition as a client."""
    plan = plan_privacy(num_examples=dataset_size, batch_size=batch_size, local_epochs=local_epochs,
                        num_rounds=rounds, target_epsilon=target_epsilon, target_delta=delta,
                        accountant=accountant, noise_multiplier=noise_multiplier)
    history, per_round = [], []
    for server_round in range(1, rounds + 1):
        history = compose(history, plan.round_entry())
        per_round.append({"round": server_round,
                          "epsilon": epsilon_of(history, delta=delta, accountant=accountant)})
    return {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "steps_per_round": plan.steps_per_round, "accountant": accountant, "delta": delta,
            "target_epsilon": target_epsilon, "rounds": per_round}


def plot_schedule(schedule: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = schedule["rounds"]
    ax.plot([r["round"] for r in rounds], [r["epsilon"] for r in rounds], marker="o", label="planned ε")
    ax.axhline(schedule["target_epsilon"], color="red", linestyle="--", label="budget")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.set_title(f"σ = {schedule['noise_multiplier']:.4f}, q = {schedule['sample_rate']:.4f}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
