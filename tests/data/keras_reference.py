"""Keras 3's numbers for tests/test_shortcuts.py: the losses, metrics, logged names and optimizer
defaults that the string shortcuts (`loss="mse"`, `metrics=["accuracy"]`, `optimizer="adam"`) reproduce.

Not run by the test suite (Keras is not a dependency). The arrays below are what the test feeds
torchcallbacks; it loads this file for them. To regenerate the reference values:

    python -m venv /tmp/kerasenv
    /tmp/kerasenv/bin/pip install "keras==3.*" numpy torch==2.13.0
    KERAS_BACKEND=torch /tmp/kerasenv/bin/python tests/data/keras_reference.py

and paste what it prints into tests/test_shortcuts.py (KERAS_* constants).
"""

from __future__ import annotations

REGRESSION_TRUE = [[0.5, 1.5, 2.0], [1.0, 0.0, 3.0], [2.5, 0.2, 0.7], [0.1, 1.9, 1.2]]
REGRESSION_PRED = [[0.7, 1.0, 2.6], [0.4, 0.3, 1.1], [2.9, 0.1, 0.8], [0.05, 2.5, 1.6]]
SAMPLE_WEIGHT = [1.0, 0.5, 2.0, 0.0]

# probabilities, with 0 and 1 (clipped to [1e-7, 1 - 1e-7]) and 0.5 (not > the 0.5 threshold)
BINARY_TRUE = [[1.0], [0.0], [1.0], [1.0], [0.0], [0.0]]
BINARY_PRED = [[0.9], [0.2], [0.4], [1.0], [0.0], [0.5]]
BINARY_WEIGHT = [1.0, 2.0, 0.5, 1.0, 1.0, 3.0]

# rows that do not sum to 1 (Keras normalises them) and a 0 for a target class (clipped)
CLASSES = [1, 0, 0, 2]
CATEGORICAL_TRUE = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
CATEGORICAL_PRED = [[0.2, 0.7, 0.1], [0.5, 0.3, 0.4], [0.0, 0.6, 0.4], [0.1, 0.1, 0.8]]

# hinge losses: labels -1/1 or 0/1 (converted by Keras), real-valued predictions
HINGE_TRUE = [[-1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]
HINGE_BINARY_TRUE = [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
HINGE_PRED = [[0.3, 0.8], [1.4, -0.2], [0.6, 0.9], [-1.5, 0.1]]

AUC_TRUE = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0]
AUC_PRED = [0.137, 0.843, 0.612, 0.451, 0.388, 0.071, 0.533, 0.977, 0.702, 0.264, 0.419, 0.826]

#: (name, y_true, y_pred, sample_weight) of each loss checked.
LOSS_CASES = [
    ("mse", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("mean_squared_error", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("mae", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("mean_absolute_error", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("mape", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),  # a target of 0: divided by 1e-7
    ("mape", REGRESSION_PRED, REGRESSION_TRUE, SAMPLE_WEIGHT),  # no zero target
    ("msle", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("huber", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("log_cosh", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("poisson", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("cosine_similarity", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("MeanSquaredError", REGRESSION_TRUE, REGRESSION_PRED, SAMPLE_WEIGHT),
    ("binary_crossentropy", BINARY_TRUE, BINARY_PRED, BINARY_WEIGHT),
    ("categorical_crossentropy", CATEGORICAL_TRUE, CATEGORICAL_PRED, SAMPLE_WEIGHT),
    ("sparse_categorical_crossentropy", CLASSES, CATEGORICAL_PRED, SAMPLE_WEIGHT),
    ("kl_divergence", CATEGORICAL_TRUE, CATEGORICAL_PRED, SAMPLE_WEIGHT),
    ("crossentropy", CLASSES, CATEGORICAL_PRED, SAMPLE_WEIGHT),
    ("hinge", HINGE_TRUE, HINGE_PRED, SAMPLE_WEIGHT),
    ("hinge", HINGE_BINARY_TRUE, HINGE_PRED, SAMPLE_WEIGHT),
    ("squared_hinge", HINGE_TRUE, HINGE_PRED, SAMPLE_WEIGHT),
    ("categorical_hinge", CATEGORICAL_TRUE, CATEGORICAL_PRED, SAMPLE_WEIGHT),
]

#: (name, y_true, y_pred) of each metric checked; "accuracy" in its three cases and more shapes.
METRIC_CASES = [
    ("accuracy", BINARY_TRUE, BINARY_PRED),
    ("accuracy", [row[0] for row in BINARY_TRUE], BINARY_PRED),
    ("accuracy", CLASSES, CATEGORICAL_PRED),
    ("accuracy", [[c] for c in CLASSES], CATEGORICAL_PRED),
    ("accuracy", CATEGORICAL_TRUE, CATEGORICAL_PRED),
    ("acc", CLASSES, CATEGORICAL_PRED),
    ("binary_accuracy", BINARY_TRUE, BINARY_PRED),
    ("categorical_accuracy", CATEGORICAL_TRUE, CATEGORICAL_PRED),
    ("sparse_categorical_accuracy", CLASSES, CATEGORICAL_PRED),
    ("mae", REGRESSION_TRUE, REGRESSION_PRED),
    ("mse", REGRESSION_TRUE, REGRESSION_PRED),
    ("mape", REGRESSION_TRUE, REGRESSION_PRED),
    ("cosine_similarity", REGRESSION_TRUE, REGRESSION_PRED),
    ("binary_crossentropy", BINARY_TRUE, BINARY_PRED),
    ("categorical_crossentropy", CATEGORICAL_TRUE, CATEGORICAL_PRED),
    ("sparse_categorical_crossentropy", CLASSES, CATEGORICAL_PRED),
    ("kl_divergence", CATEGORICAL_TRUE, CATEGORICAL_PRED),
    ("hinge", HINGE_TRUE, HINGE_PRED),
    ("log_cosh_error", REGRESSION_TRUE, REGRESSION_PRED),
    ("MeanAbsoluteError", REGRESSION_TRUE, REGRESSION_PRED),
    ("ACC", BINARY_TRUE, BINARY_PRED),
    ("auc", AUC_TRUE, AUC_PRED),
]


def main() -> None:
    import keras
    import numpy as np
    from keras.src.trainers import compile_utils

    def arr(values: list) -> np.ndarray:
        array = np.array(values)
        return array.astype("float32") if array.dtype.kind == "f" else array

    print(f"# Keras {keras.__version__}, backend {keras.backend.backend()}")
    print("KERAS_LOSSES = [  # (name, mean, weighted mean)")
    for name, y_true, y_pred, weight in LOSS_CASES:
        t, p = arr(y_true), arr(y_pred)
        loss = compile_utils.get_loss(name, t, p)
        plain = float(loss(t, p))
        weighted = float(loss(t, p, sample_weight=arr(weight)))
        print(f"    ({name!r}, {plain!r}, {weighted!r}),")
    print("]")
    print("KERAS_METRICS = [  # (name, Keras class, logged name, value)")
    for name, y_true, y_pred in METRIC_CASES:
        t, p = arr(y_true), arr(y_pred)
        metric = compile_utils.get_metric(name, t, p)
        metric.update_state(t, p)
        kind = type(metric).__name__ if type(metric).__name__ != "MeanMetricWrapper" else metric._fn.__name__
        print(f"    ({name!r}, {kind!r}, {metric.name!r}, {float(metric.result())!r}),")
    print("]")

    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy", "acc", "mae"])
    history = model.fit(x, y, epochs=1, validation_split=0.25, verbose=0)
    print(f"KERAS_HISTORY_KEYS = {sorted(history.history)!r}")

    defaults = {}
    for name in ("sgd", "adam", "adamw", "rmsprop", "Adam", "RMSprop"):
        config = keras.optimizers.get(name).get_config()
        keep = ("learning_rate", "momentum", "nesterov", "beta_1", "beta_2", "epsilon", "amsgrad", "rho",
                "centered", "weight_decay")
        defaults[name] = {k: config[k] for k in keep if k in config}
    print(f"KERAS_OPTIMIZERS = {defaults!r}")


if __name__ == "__main__":
    main()
