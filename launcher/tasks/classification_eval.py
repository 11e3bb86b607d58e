"""Validation metrics of the classification tasks, over the whole validation set.

Every rank predicts a strided share of the examples; the (example index, prediction) pairs of
all ranks are gathered exactly (no example twice, none lost to padding or an uneven last
batch) and the metrics are computed from them with scikit-learn and seqeval, so a 2-worker
run reports what one process would on the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from launcher.tasks import classification
from launcher.data.tokenized import IGNORE_INDEX, TokenizedSplit
from launcher.ranks import Rank, gather
from launcher.tasks.evaluation import Totals, evaluating, sharded
from launcher.recipe.sections import LabelsSection

Prediction = Any  # class probabilities, a number, or a list of tag indices


def predictions(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str, problem: str
) -> list[Prediction]:
    """One picklable prediction per example of a batch."""
    logits = logits.float().cpu()
    if task == "token_classification":
        tags = logits.argmax(-1)
        keep = batch["labels"].cpu() != IGNORE_INDEX
        return [tags[row][keep[row]].tolist() for row in range(len(tags))]
    if problem == "regression":
        return logits.squeeze(-1).tolist()
    if problem == "multi_label":
        return torch.sigmoid(logits).tolist()
    return torch.softmax(logits, -1).tolist()


def evaluate(
    model: Any,
    make: Callable[[np.ndarray], dict[str, Any]],
    split: TokenizedSplit,
    rank: Rank,
    micro: int,
    max_batches: int | None,
    task: str,
    labels: LabelsSection,
) -> dict[str, float]:
    """eval_loss and the task's metrics; ``make`` turns example indices into a device batch."""
    problem = labels.problem_type
    totals = Totals(2, rank)
    mine: list[tuple[int, Prediction]] = []
    with evaluating(model):
        for indices, real in sharded(np.arange(len(split)), rank, micro, max_batches):
            batch = make(indices)
            logits = classification.model_logits(model, batch)
            if not real:
                continue
            totals.add(
                classification.loss_sum(logits, batch["labels"], problem),
                classification.target_count(batch["labels"], problem),
            )
            mine += zip(indices.tolist(), predictions(logits, batch, task, problem))
    loss_sum, count = totals.reduced()
    merged = merge_predictions(gather(mine, rank))
    names = labels.names or []
    if task == "token_classification":
        metrics = tagging_metrics(gold_tags(split, list(merged)), list(merged.values()), names)
    else:
        metrics = sequence_metrics(split.targets[list(merged)], list(merged.values()), problem)
    return {"eval_loss": loss_sum / max(count, 1), **metrics}


def merge_predictions(
    per_rank: Sequence[Sequence[tuple[int, Prediction]]],
) -> dict[int, Prediction]:
    """Predictions by example index, in index order; an index predicted twice is a bug."""
    merged: dict[int, Prediction] = {}
    for pairs in per_rank:
        for index, prediction in pairs:
            if index in merged:
                raise RuntimeError(f"validation example {index} was evaluated twice")
            merged[index] = prediction
    return dict(sorted(merged.items()))


def gold_tags(split: TokenizedSplit, indices: Sequence[int]) -> list[list[int]]:
    return [[int(t) for t in split.example(i)[1] if t != IGNORE_INDEX] for i in indices]


def sequence_metrics(
    gold: np.ndarray, scores: Sequence[Prediction], problem: str
) -> dict[str, float]:
    """Sequence classification metrics from gold targets and predicted scores."""
    from sklearn import metrics as m

    if problem == "regression":
        from scipy.stats import pearsonr, spearmanr

        pred = np.asarray(scores, dtype=np.float64)
        return {
            "eval_mse": float(m.mean_squared_error(gold, pred)),
            "eval_pearson": float(pearsonr(gold, pred).statistic),
            "eval_spearman": float(spearmanr(gold, pred).statistic),
        }
    probs = np.asarray(scores, dtype=np.float64)
    if problem == "multi_label":
        gold = gold.astype(int)
        pred = (probs > 0.5).astype(int)
        p, r, f, _ = m.precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
        return {
            # subset accuracy: every label of the example right
            "eval_accuracy": float(m.accuracy_score(gold, pred)),
            "eval_precision": float(p), "eval_recall": float(r), "eval_f1": float(f),
            "eval_f1_macro": float(m.f1_score(gold, pred, average="macro", zero_division=0)),
        }
    pred = probs.argmax(-1)
    binary = probs.shape[1] == 2
    p, r, f, _ = m.precision_recall_fscore_support(
        gold, pred, average="binary" if binary else "macro", zero_division=0,
        labels=None if binary else list(range(probs.shape[1])),
    )
    out = {
        "eval_accuracy": float(m.accuracy_score(gold, pred)),
        "eval_precision": float(p), "eval_recall": float(r), "eval_f1": float(f),
        "eval_mcc": float(m.matthews_corrcoef(gold, pred)),
    }
    if binary and len(np.unique(gold)) == 2:
        out["eval_roc_auc"] = float(m.roc_auc_score(gold, probs[:, 1]))
    if not binary:
        out["eval_f1_micro"] = float(m.f1_score(gold, pred, average="micro"))
    return out


def tagging_metrics(
    gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], names: Sequence[str]
) -> dict[str, float]:
    """Entity-level precision/recall/F1 over BIO spans (seqeval) and per-word accuracy."""
    from seqeval import metrics as s

    gold_names = [[names[t] for t in seq] for seq in gold]
    pred_names = [[names[t] for t in seq] for seq in pred]
    return {
        "eval_accuracy": float(s.accuracy_score(gold_names, pred_names)),
        "eval_precision": float(s.precision_score(gold_names, pred_names, zero_division=0)),
        "eval_recall": float(s.recall_score(gold_names, pred_names, zero_division=0)),
        "eval_f1": float(s.f1_score(gold_names, pred_names, zero_division=0)),
    }
