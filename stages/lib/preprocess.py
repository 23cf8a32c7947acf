"""The one preprocessing of images into model inputs, shared by training and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)


def to_model_input(images: Any) -> Any:
    """uint8 images ``(n, 28, 28)`` to float32 ``(n, 28, 28, 1)`` in [0, 1], the CNN's input.

    ``images`` is a NumPy array (evaluation) or a TensorFlow tensor (training converts each batch inside its
    tf.data pipeline, so the float32 copy of the whole training set never exists); the result is of the same
    kind and, value for value, the same: both divide the float32 pixel by float32 255, correctly rounded.
    """
    # Scale images to the [0, 1] range and add the channel axis
    if isinstance(images, np.ndarray):
        return (images.astype(np.float32) / np.float32(255.0))[..., np.newaxis]
    import tensorflow as tf

    return (tf.cast(images, tf.float32) / tf.constant(255.0, tf.float32))[..., tf.newaxis]


def to_flat_input(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(n, 28, 28)`` to float32 ``(n, 784)`` in [0, 1], the linear baselines' input."""
    return to_model_input(images).reshape(len(images), -1)


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Integer labels ``(n,)`` to float32 one-hot rows ``(n, num_classes)``."""
    return np.eye(num_classes, dtype=np.float32)[labels]
