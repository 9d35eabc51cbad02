"""How the probe defaults were chosen: step size, steps and the label prior per budget, scored on
the clients' validation splits (never the test split).

    python -m benchmarks.probe_tuning [--seeds N]

A probe round trains the head alone on frozen features, so the candidates are compared on the
features themselves: each client's train and validation records are pooled once by the real model
(`common.models.pooled_features.pooled_features`), then each candidate runs a 5-client, 3-round FedAvg of
`client.probe_round.train_probe_round`'s own inner call (Opacus DP-SGD on the head, full batch,
the plan a client makes) in this process. Minutes instead of hours; the utility benchmark then
measures the chosen defaults end to end.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.harness import log, machine, markdown_table, publish, write_result

NAME = "probe_tuning"
EPSILONS = (1.0, 3.0, 8.0)
CANDIDATES = [{"probe_learning_rate": lr, "probe_steps": steps, "head_prior": prior}
              for lr in (2.0, 5.0) for steps in (8, 16) for prior in (False, True)]


def client_features(seed: int):
    """(label names, per client (train features, validation features)) for the utility job's split."""
    from fedtune.common.models.pooled_features import pooled_features
    from fedtune.common.config import RunConfig
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.pooled_classifier import HeadSettings
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.run_data import federated_splits
    from fedtune.common.tasks import get_task
    from fedtune.common.tasks.classification import encode

    config = RunConfig(training_mode="probe", max_length=64, seed=seed, secure_aggregation=False)
    task, splits = get_task("classification"), federated_splits(config)
    path = task.model_path(config.model)
    tokenizer = load_tokenizer(path)
    model = task.build_model(model_path=path, num_labels=len(splits.label_names), lora=LoraSettings.from_config(config),
                             seed=seed, head=HeadSettings(mode="probe", prior=tuple(splits.label_names)))
    prior = [p.detach().clone() for p in (model.get_base_model().classifier.modules_to_save["default"].weight,
                                          model.get_base_model().classifier.modules_to_save["default"].bias)]
    parts = [tuple(pooled_features(model, encode(tokenizer=tokenizer, split=part, max_length=64))
                   for part in (client.train, client.validation)) for client in splits.clients]
    return prior, parts


def federated_probe(*, prior, parts, candidate: dict, epsilon: float, seed: int) -> float:
    """Validation accuracy (all clients' validation records) after 3 rounds of FedAvg."""
    from types import SimpleNamespace

    from fedtune.client.probe_round import head_loss
    from fedtune.client.trainer import train_locally
    from fedtune.common.privacy.plan import plan_of_config

    weight = prior[0].clone() if candidate["head_prior"] else torch.zeros_like(prior[0])
    bias = torch.zeros_like(prior[1])
    for server_round in range(1, 4):
        heads, sizes = [], []
        for train, _ in parts:
            head = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
            config = SimpleNamespace(training_mode="probe", probe_steps=candidate["probe_steps"], num_rounds=3,
                                     target_epsilon=epsilon, target_delta=1e-5, accountant="prv",
                                     noise_multiplier=0.0, batch_size=64, local_epochs=1)
            plan = plan_of_config(config, num_examples=len(train))
            train_locally(model=head, dataset=train, loss=head_loss, learning_rate=candidate["probe_learning_rate"],
                          batch_size=len(train), local_epochs=candidate["probe_steps"], max_grad_norm=1.0,
                          plan=plan, history=[], seed=seed * 1000 + server_round, optimizer="sgd")
            heads.append(head)
            sizes.append(len(train))
        total = sum(sizes)
        weight = sum(h.weight.detach() * n for h, n in zip(heads, sizes)) / total
        bias = sum(h.bias.detach() * n for h, n in zip(heads, sizes)) / total
    features = torch.cat([v.tensors[0] for _, v in parts])
    labels = torch.cat([v.tensors[1] for _, v in parts])
    return float(((features @ weight.T + bias).argmax(-1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scores: dict[tuple, list[float]] = {}
    for seed in range(args.seeds):
        log(f"seed {seed}: pooling every client's records")
        prior, parts = client_features(seed)
        for epsilon in EPSILONS:
            for index, candidate in enumerate(CANDIDATES):
                accuracy = federated_probe(prior=prior, parts=parts, candidate=candidate, epsilon=epsilon, seed=seed)
                scores.setdefault((epsilon, index), []).append(accuracy)
    rows = [{"epsilon": eps, **CANDIDATES[i], "accuracy": statistics.mean(v), "accuracy_std": statistics.stdev(v)
             if len(v) > 1 else 0.0} for (eps, i), v in sorted(scores.items())]
    write_result(NAME, {"seeds": args.seeds, "rows": rows}, quick=False)
    table = markdown_table(["target ε", "SGD step", "steps / round", "label prior", "validation accuracy"],
                           [[f"{r['epsilon']:g}", f"{r['probe_learning_rate']:g}", r["probe_steps"],
                             "yes" if r["head_prior"] else "no", f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}"]
                            for r in rows])
    publish(NAME, f"Machine: {machine()}. Job: the utility benchmark's (BBC News, 5 IID clients, 3 rounds, max-length "
                  f"64), probe rounds on pooled MiniLM features, mean ± std over {args.seeds} seeds. Command: "
                  f"`python -m benchmarks.probe_tuning`.\n\n{table}", quick=False)


if __name__ == "__main__":
    main()
