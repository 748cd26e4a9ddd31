"""The reference host's tasks, all in memory and download-free.

digits     scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
           a stratified 80/20 train/validation split, standardised with train statistics.
sequence   synthetic "majority token" classification: sequences of 12 tokens from a
           vocabulary of 8; the label is the most frequent token (ties: the smallest id).
sort       synthetic sorting: sequences of 8 tokens from a vocabulary of 10; the label at
           every position is the sorted sequence's token there (per-position accuracy).
teacher    a random teacher network labels Gaussian feature vectors (8 features, 5
           classes): argmax of a fixed tanh MLP with two hidden layers of 32 units.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Split:
    """A task's tensors: inputs and integer labels for training and validation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: int

    def to(self, device: torch.device | str) -> Split:
        return Split(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_val.to(device),
            self.y_val.to(device),
            self.classes,
        )


def digits(split_seed: int = 0, val_fraction: float = 0.2) -> Split:
    """scikit-learn's digits as [N, 1, 8, 8] float tensors (the split is fixed by `split_seed`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, labels, test_size=val_fraction, random_state=split_seed, stratify=labels
    )
    x_train = torch.tensor(x_tr, dtype=torch.float32).view(-1, 1, 8, 8)
    x_val = torch.tensor(x_va, dtype=torch.float32).view(-1, 1, 8, 8)
    mean, std = x_train.mean(), x_train.std()
    return Split(
        (x_train - mean) / std, torch.tensor(y_tr), (x_val - mean) / std, torch.tensor(y_va), classes=10
    )


def majority_sequences(
    data_seed: int = 0, n_train: int = 3000, n_val: int = 600, vocab: int = 8, length: int = 12
) -> Split:
    """Token sequences [N, length] whose label is their most frequent token."""
    g = torch.Generator().manual_seed(10_000 + data_seed)
    n = n_train + n_val
    favourite = torch.randint(vocab, (n, 1), generator=g)
    noise = torch.randint(vocab, (n, length), generator=g)
    tokens = torch.where(torch.rand(n, length, generator=g) < 0.25, favourite, noise)
    counts = torch.nn.functional.one_hot(tokens, vocab).sum(dim=1)
    labels = counts.argmax(dim=1)  # argmax returns the first maximum: ties go to the smallest id
    return Split(tokens[:n_train], labels[:n_train], tokens[n_train:], labels[n_train:], classes=vocab)


def sorted_sequences(
    data_seed: int = 0, n_train: int = 4000, n_val: int = 1000, vocab: int = 10, length: int = 8
) -> Split:
    """Token sequences [N, length]; labels [N, length] are the same tokens sorted ascending."""
    g = torch.Generator().manual_seed(20_000 + data_seed)
    tokens = torch.randint(vocab, (n_train + n_val, length), generator=g)
    labels = tokens.sort(dim=1).values
    return Split(tokens[:n_train], labels[:n_train], tokens[n_train:], labels[n_train:], classes=vocab)


def teacher_labels(
    data_seed: int = 0,
    n_train: int = 20_000,
    n_val: int = 2000,
    features: int = 8,
    classes: int = 5,
    hidden: int = 32,
) -> Split:
    """Gaussian features [N, features] labelled by a random wide tanh teacher (argmax of its logits).

    The teacher's logits are centred per class over the data, so every class occurs.
    """
    g = torch.Generator().manual_seed(30_000 + data_seed)
    n = n_train + n_val
    x = torch.randn(n, features, generator=g)
    sizes = [features, hidden, hidden, classes]
    h = x
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        weight = torch.randn(fan_in, fan_out, generator=g) * (2.0 / fan_in) ** 0.5
        h = h @ weight
        if i < len(sizes) - 2:
            h = torch.tanh(h)
    labels = (h - h.mean(dim=0)).argmax(dim=1)
    return Split(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], classes=classes)


TASKS = ("digits", "sequence", "sort", "teacher")


@functools.lru_cache(maxsize=8)
def load_task(task: str) -> Split:
    """The task's data. Fixed across run seeds, so runs differ only in init and batch order.

    Cached: runs in one process share the (never modified) tensors.
    """
    if task == "digits":
        return digits()
    if task == "sequence":
        return majority_sequences()
    if task == "sort":
        return sorted_sequences()
    if task == "teacher":
        return teacher_labels()
    raise ValueError(f"unknown task {task!r} ({' | '.join(TASKS)})")


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over (x, y) in minibatches (the last one may be short)."""
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for start in range(0, x.shape[0], size):
        index = order[start : start + size]
        yield x[index], y[index]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
