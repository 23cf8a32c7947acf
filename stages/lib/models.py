"""The one CNN model factory and loader, shared by train_cnn (builds and trains) and evaluate (loads).

With the defaults of params.yaml, :func:`build_cnn` is the classic Keras MNIST convnet:
Conv32-Pool-Conv64-Pool-Conv64-Flatten-Dense64-Dense10 (93,322 parameters), Adam at 1e-3.
Keras is imported inside the functions: stages hide the GPU before TensorFlow is first imported.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stages.lib import files
from stages.lib.errors import UserError
from stages.lib.preprocess import IMAGE_SHAPE, NUM_CLASSES

if TYPE_CHECKING:
    import keras

INPUT_SHAPE = (*IMAGE_SHAPE, 1)
PRECISIONS = ("float32", "mixed_bfloat16")
OPTIMIZERS = ("adam", "sgd")


def feature_map_sizes(
    filters: Sequence[int], kernel_size: int, image_size: int = IMAGE_SHAPE[0], convs_per_block: int = 1
) -> list[int]:
    """Side length of the feature maps after each conv block (and its pooling), for a square image.

    A block is ``convs_per_block`` unpadded convolutions (each: side - kernel_size + 1); 2×2 max-pooling
    with stride 2 follows every block but the last (side // 2). Raises ``ValueError`` when the stack
    shrinks the image below 1 pixel.
    """
    sizes = []
    side = image_size
    for i in range(len(filters)):
        side -= convs_per_block * (kernel_size - 1)
        if side >= 1 and i < len(filters) - 1:
            side //= 2
        if side < 1:
            raise ValueError(
                f"filters = {list(filters)} with kernel_size = {kernel_size}: conv layer {i + 1} "
                f"(with the 2×2 pooling that follows all but the last) shrinks the {image_size}×{image_size} image "
                "below 1 pixel; use a smaller kernel_size or fewer entries in filters"
                + (f" or convs_per_block (now {convs_per_block})" if convs_per_block > 1 else "")
            )
        sizes.append(side)
    return sizes


def check_options(precision: str, optimizer: str, dropout: float, lr_decay: float, steps_per_epoch: int | None) -> None:
    """Raise ``ValueError`` for a setting of :func:`build_cnn` that cannot work."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer = {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout = {dropout!r}: expected a fraction in [0, 1)")
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay = {lr_decay!r}: expected a factor in (0, 1]")
    if lr_decay < 1.0 and not steps_per_epoch:
        raise ValueError("lr_decay < 1 needs the number of training steps per epoch (steps_per_epoch)")


def make_optimizer(
    optimizer: str, learning_rate: float, lr_decay: float, steps_per_epoch: int | None
) -> keras.optimizers.Optimizer:
    """Adam or plain SGD at ``learning_rate``, multiplied by ``lr_decay`` after every epoch of
    ``steps_per_epoch`` steps when ``lr_decay`` < 1 (staircase exponential decay)."""
    import keras

    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if lr_decay < 1.0:
        rate = keras.optimizers.schedules.ExponentialDecay(learning_rate, steps_per_epoch, lr_decay, staircase=True)
    return (
        keras.optimizers.Adam(learning_rate=rate) if optimizer == "adam" else keras.optimizers.SGD(learning_rate=rate)
    )


def build_cnn(
    filters: Sequence[int] = (32, 64, 64),
    kernel_size: int = 3,
    dense_units: int = 64,
    dropout: float = 0.0,
    l2: float = 0.0,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    precision: str = "float32",
    steps_per_execution: int = 1,
    convs_per_block: int = 1,
    batch_norm: bool = False,
    lr_decay: float = 1.0,
    steps_per_epoch: int | None = None,
    jit_compile: bool = False,
) -> keras.Model:
    """Build and compile the CNN (input float32 ``(n, 28, 28, 1)`` in [0, 1], output softmax ``(n, 10)``).

    ``filters``: one unpadded ``kernel_size``×``kernel_size`` ReLU Conv2D per entry, 2×2 max-pooling after all
    but the last. ``dropout`` > 0 adds Dropout before the hidden Dense layer of ``dense_units``; ``l2`` > 0
    puts an L2 penalty on every conv and dense kernel. ``optimizer`` is ``adam`` or ``sgd`` at
    ``learning_rate``; loss categorical cross-entropy (one-hot targets), metric accuracy.
    ``precision`` ``mixed_bfloat16`` computes in bfloat16 with float32 weights; the output layer stays
    float32 so the softmax and the loss are exact. ``steps_per_execution`` training steps run per
    TensorFlow call. ``convs_per_block`` convolutions make each block (one per ``filters`` entry);
    ``batch_norm`` adds BatchNormalization after every conv and after the hidden Dense layer.
    ``lr_decay`` < 1 multiplies the learning rate by that factor after every epoch of ``steps_per_epoch``
    training steps (staircase exponential decay). The defaults (1, False, 1.0) build exactly the model
    without these options. Raises ``ValueError`` for a configuration that cannot work.

    ``jit_compile`` compiles the training step with XLA (train_cnn asks for it on a GPU only).
    """
    import keras
    from keras import layers

    feature_map_sizes(filters, kernel_size, convs_per_block=convs_per_block)
    check_options(precision, optimizer, dropout, lr_decay, steps_per_epoch)

    # The policy is set per layer, not globally, so building one model never changes the next one. It is
    # passed by name: a shared policy object would be saved with its memory address, changing the file bytes.
    policy = precision

    def regularizer() -> keras.regularizers.Regularizer | None:  # one per layer, for the same reason
        return keras.regularizers.L2(l2) if l2 > 0 else None

    # Feature extractor: conv blocks (optionally batch-normalised), max-pooling after all but the last
    stack: list[keras.layers.Layer] = [keras.Input(shape=INPUT_SHAPE)]
    for i, n_filters in enumerate(filters):
        for _ in range(convs_per_block):
            stack.append(
                layers.Conv2D(n_filters, kernel_size, activation="relu", kernel_regularizer=regularizer(), dtype=policy)
            )
            if batch_norm:
                stack.append(layers.BatchNormalization(dtype=policy))
        if i < len(filters) - 1:
            stack.append(layers.MaxPooling2D(pool_size=2, dtype=policy))

    # Classifier head; the output layer computes in float32 whatever the policy
    stack.append(layers.Flatten(dtype=policy))
    if dropout > 0:
        stack.append(layers.Dropout(dropout, dtype=policy))
    stack.append(layers.Dense(dense_units, activation="relu", kernel_regularizer=regularizer(), dtype=policy))
    if batch_norm:
        stack.append(layers.BatchNormalization(dtype=policy))
    stack.append(layers.Dense(NUM_CLASSES, activation="softmax", kernel_regularizer=regularizer(), dtype="float32"))
    model = keras.Sequential(stack, name="mnist_cnn")

    # Categorical cross-entropy; XLA only when asked (train_cnn turns it on for a GPU; on the CPU it is slower)
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate, lr_decay, steps_per_epoch),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    return model


def save_cnn(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """Save ``model`` to ``path`` (``.keras``) atomically, with bytes that depend only on the model.

    Keras stamps the save time into the archive (``date_saved`` and a member's timestamp); both are
    removed here, so retraining to the same weights leaves an identical file and DVC re-runs nothing
    downstream.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmpdir:
        staged = Path(tmpdir) / "model.keras"  # Keras insists on the .keras suffix
        model.save(staged)
        with zipfile.ZipFile(staged) as src, files.deterministic_zip(path) as dst:
            for member in src.infolist():
                data = src.read(member)
                if member.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata.pop("date_saved", None)
                    data = json.dumps(metadata, sort_keys=True).encode("utf-8")
                dst.write(member.filename, data, member.compress_type)


def load_cnn(path: str | os.PathLike[str]) -> keras.Model:
    """Load a CNN saved by train_cnn (``.keras``) for inference: safe mode (no arbitrary code), not compiled."""
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot load it as a Keras model ({exc}). Re-create it with `dvc repro --force train_cnn`."
        ) from None
