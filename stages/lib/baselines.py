"""The linear baselines: Ridge and Lasso regressions on one-hot targets, class = argmax of the ten outputs.

These are the optimisation article's L2 / L1 regularised least-squares models. Shared by train_baseline
(builds, fits, saves) and evaluate (loads, predicts). Models are stored with skops, a documented format
that is loaded without unpickling, and :func:`load_sklearn` refuses any type outside :data:`ALLOWED_TYPES`.

Speed: a plain ``Lasso`` runs coordinate descent over the 55000×784 data matrix, one pass per target and
sweep. With ``precompute=True`` scikit-learn forms the Gram matrix ``XᵀX`` and ``Xᵀy`` once (from the
centered data, as its intercept handling requires) and coordinate descent works on the 784×784 Gram
alone: the same iterates, 1–2 s instead of 18–24 s on an idle 2-core machine, and instead of minutes when
other jobs compete for memory bandwidth (``python -m benchmarks baselines``). Both models are fitted in
float64, where the two Lasso paths agree to rounding (~1e-13; a float32 Gram differs by ~1e-4).
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import Lasso, Ridge

from stages.lib import files
from stages.lib.errors import UserError

BASELINES = ("ridge", "lasso")

# Every type a saved Ridge or Lasso may contain, as "<module>.<qualname>". Anything else in a file is refused
# before loading, even types skops trusts by default (it trusts every scikit-learn estimator).
ALLOWED_TYPES = frozenset(
    {
        "sklearn.linear_model._ridge.Ridge",
        "sklearn.linear_model._coordinate_descent.Lasso",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.float32",
        "numpy.float64",
        "numpy.int32",
        "numpy.int64",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.str",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
    }
)

LinearBaseline = Ridge | Lasso


def build_baseline(name: str, alpha: float, max_iter: int | None = None, tol: float | None = None) -> LinearBaseline:
    """An unfitted baseline: ``ridge`` → ``Ridge(alpha)``; ``lasso`` → ``Lasso(alpha, max_iter, tol)`` on a Gram matrix.

    ``max_iter`` and ``tol`` apply to the Lasso's coordinate descent (``None``: scikit-learn's defaults,
    1000 and 1e-4); Ridge has a closed-form solution and refuses them. Both solvers are deterministic
    (Ridge: Cholesky; Lasso: cyclic coordinate descent), so no ``random_state`` is involved.
    Raises ``ValueError`` for an unknown name or a parameter the model does not use.
    """
    if name == "ridge":
        if max_iter is not None or tol is not None:
            raise ValueError("ridge has a closed-form solution: max_iter and tol do not apply")
        return Ridge(alpha=alpha)
    if name == "lasso":
        defaults = Lasso()
        return Lasso(
            alpha=alpha,
            max_iter=defaults.max_iter if max_iter is None else max_iter,
            tol=defaults.tol if tol is None else tol,
            # Gram matrix of the centered data, computed once for all ten targets: same solution as
            # precompute=False, without a pass over the full data matrix per coordinate-descent sweep
            precompute=True,
            selection="cyclic",
        )
    raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")


def fit_baseline(model: LinearBaseline, x_flat: np.ndarray, y_onehot: np.ndarray) -> LinearBaseline:
    """Fit ``model`` to flat inputs ``(n, 784)`` and one-hot targets ``(n, 10)``, in float64; return it.

    Float64 keeps the fast Lasso path on the plain fit's solution and Ridge's normal equations
    well conditioned. scikit-learn warns (``ConvergenceWarning``) when the Lasso stops at ``max_iter``.

    OpenBLAS splits the Gram matrix over its threads, so the Lasso's last bits depend on the core count
    (on one thread the full Lasso took 1.9 to 2.8 s instead of 1.2 to 1.3 s on two cores).
    """
    return model.fit(np.asarray(x_flat, dtype=np.float64), np.asarray(y_onehot, dtype=np.float64))


def predict_scores(model: LinearBaseline, x_flat: np.ndarray) -> np.ndarray:
    """The ten regression outputs per image ``(n, 10)``: scores, not probabilities (they can be < 0 or > 1)."""
    return np.asarray(model.predict(x_flat))


def predict_classes(model: LinearBaseline, x_flat: np.ndarray) -> np.ndarray:
    """Predicted digit per image ``(n,)``: the argmax of the regression outputs."""
    return predict_scores(model, x_flat).argmax(axis=1)


def stable_members(archive: bytes) -> list[tuple[str, bytes]]:
    """The members of the skops archive ``archive`` with stable names: skops names each array file, and marks
    each object in ``schema.json``, by the object's memory address (``id()``), which differs from run to run.
    Here every such id becomes its order of first appearance in the schema, in files and schema alike; the
    arrays follow in that order, then ``schema.json``."""
    with zipfile.ZipFile(io.BytesIO(archive)) as src:
        schema = json.loads(src.read("schema.json"))
        arrays = {name: src.read(name) for name in src.namelist() if name != "schema.json"}
    ids: dict[int, int] = {}

    def renumber(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("__id__"), int):
                node["__id__"] = ids.setdefault(node["__id__"], len(ids))
            if node.get("type") == "numpy" and isinstance(node.get("file"), str):
                node["file"] = f"{ids.setdefault(int(node['file'].removesuffix('.npy')), len(ids))}.npy"
            for value in node.values():
                renumber(value)
        elif isinstance(node, list):
            for value in node:
                renumber(value)

    renumber(schema)
    renamed = {f"{ids[int(name.removesuffix('.npy'))]}.npy": data for name, data in arrays.items()}
    members = [(name, renamed[name]) for name in sorted(renamed, key=lambda n: int(n.removesuffix(".npy")))]
    return [*members, ("schema.json", json.dumps(schema, indent=2).encode("utf-8"))]


def round_dual_gap(gap: float | np.ndarray) -> float | np.ndarray:
    """A Lasso's ``dual_gap_`` (a convergence diagnostic) to 6 significant digits. Its last bits depend on the
    heap address of a temporary array (OpenBLAS' dgemv sums in another order when it is aligned otherwise),
    so two processes fitting the same coefficients stored different gaps; the coefficients never differ."""
    rounded = np.vectorize(lambda g: float(f"{g:.6g}"), otypes=[np.float64])(gap)
    return rounded if isinstance(gap, np.ndarray) else float(rounded)


def save_sklearn(model: LinearBaseline, path: str | os.PathLike[str]) -> None:
    """Save ``model`` to ``path`` in skops format, atomically, with bytes that depend only on the model: the
    same fitted model gives the same file (:func:`stable_members`, fixed member times), so a baseline that
    re-runs to the same weights re-runs nothing downstream."""
    import skops.io

    if isinstance(model, Lasso):
        model = copy.copy(model)
        model.dual_gap_ = round_dual_gap(model.dual_gap_)
    with files.deterministic_zip(path) as archive:
        for name, data in stable_members(skops.io.dumps(model)):
            archive.write(name, data)


def _types_in_schema(node: Any, found: set[str]) -> None:
    """Collect ``module.class`` of every node in a skops ``schema.json`` (read as plain JSON, nothing imported)."""
    if isinstance(node, dict):
        if isinstance(node.get("__class__"), str):
            found.add(f"{node.get('__module__')}.{node['__class__']}")
        for value in node.values():
            _types_in_schema(value, found)
    elif isinstance(node, list):
        for value in node:
            _types_in_schema(value, found)


def audit(path: str | os.PathLike[str]) -> tuple[list[str], set[str]]:
    """Types a skops file would instantiate: ``(untrusted, named)``, without loading it.

    ``untrusted`` is skops' own audit (types outside its default trust); ``named`` is every ``module.class``
    in the file's schema, read as plain JSON. Raises :class:`UserError` when the file is not a skops archive.
    """
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=Path(path))
        with zipfile.ZipFile(path) as zf:
            schema = json.loads(zf.read("schema.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable skops file ({exc})") from None
    named: set[str] = set()
    _types_in_schema(schema, named)
    return untrusted, named


def load_sklearn(path: str | os.PathLike[str], stage: str = "train_baseline") -> LinearBaseline:
    """Load a Ridge or Lasso saved by :func:`save_sklearn`, refusing any type outside :data:`ALLOWED_TYPES`.

    Check the file's sha256 against its card first (:func:`stages.lib.cards.read_card`). Raises
    :class:`UserError` (naming ``stage`` to re-run) for an unreadable file, a disallowed type, or an object
    that is not a fitted Ridge or Lasso.
    """
    import skops.io

    fix = f"Re-create it with `dvc repro --force {stage}`."
    untrusted, named = audit(path)
    refused = sorted((set(untrusted) | named) - ALLOWED_TYPES)
    if refused:
        raise UserError(
            f"{path}: contains types a Ridge/Lasso model never holds ({', '.join(refused)}); refusing to load it. {fix}"
        )
    try:
        # Every type is allow-listed by now; trust exactly the ones skops asks about
        model = skops.io.load(path, trusted=untrusted)
    except Exception as exc:  # skops raises many types for a malformed archive; the message says which
        raise UserError(f"{path}: cannot load it with skops ({type(exc).__name__}: {exc}). {fix}") from None
    if not isinstance(model, Ridge | Lasso):
        raise UserError(f"{path}: holds a {type(model).__name__}, not a Ridge or Lasso. {fix}")
    if not hasattr(model, "coef_"):
        raise UserError(f"{path}: holds an unfitted {type(model).__name__}. {fix}")
    return model
