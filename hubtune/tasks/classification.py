"""What text and image classification share: the loss, the metrics, the predictions schema.

The predictions frame is the contract with the audit (``predictions.parquet``): one row per
test example with ``row_id``, ``label``/``prediction`` (names), ``label_id``/``prediction_id``,
one ``prob_<label>`` column per class, and every sensitive column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from hubtune.data import PreparedData

__all__ = ["example_losses", "loss", "metrics", "predictions", "task"]


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in float32 (autocast logits may be bf16)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels)


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example (the membership audit's scores)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels, reduction="none")


def metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over a whole split."""
    import torch.nn.functional as F
    from sklearn.metrics import f1_score

    predicted = logits.argmax(-1)
    return {
        "loss": F.cross_entropy(logits.float(), labels).item(),
        "accuracy": (predicted == labels).float().mean().item(),
        "macro_f1": float(
            f1_score(
                labels.numpy(),
                predicted.numpy(),
                labels=list(range(num_labels)),
                average="macro",
                zero_division=0,
            )
        ),
    }


def predictions(
    data: PreparedData, logits: torch.Tensor, labels: torch.Tensor, split: str = "test"
) -> pd.DataFrame:
    """A split's predictions in the audit's schema (see the module docstring): the test split's
    for the audit, the validation split's for post-processing (``hubtune mitigate``)."""
    import numpy as np
    import pandas as pd
    import torch

    test = data.splits[split]
    probs = torch.softmax(logits.float(), dim=-1).numpy()
    predicted = probs.argmax(-1)
    names = np.array(data.label_names, dtype=object)
    frame = pd.DataFrame(
        {
            "row_id": test["row_id"].to_numpy(),
            "label": names[labels.numpy()],
            "prediction": names[predicted],
            "label_id": labels.numpy().astype("int64"),
            "prediction_id": predicted.astype("int64"),
        }
    )
    for k, name in enumerate(data.label_names):
        frame[f"prob_{name}"] = probs[:, k]
    for column in data.sensitive_columns:
        frame[column] = test[column].to_numpy()
    return frame


def task(**specific: Any) -> Any:
    """A classification :class:`~hubtune.tasks.Task`: the shared loss, metrics and predictions
    schema, plus what differs between text and images (``specific``)."""
    from hubtune.tasks import Task

    return Task(
        loss=loss,
        example_losses=example_losses,
        metrics=metrics,
        predictions=predictions,
        **specific,
    )
