"""Tiny MNIST-format data for tests: learnable, deterministic, generated (never downloaded)."""

from __future__ import annotations

import numpy as np


def make_mnist(n_train: int = 600, n_test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays in the Keras ``mnist.npz`` layout: ``x_*`` uint8 (n, 28, 28), ``y_*`` uint8 (n,).

    Each class is a fixed random blob pattern plus noise, so models can learn it in an epoch or two.
    Labels cycle through 0..9 so every class appears in every split.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, 28, 28)) ** 4 * 255

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        x = prototypes[y] * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 20, (n, 28, 28))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
