"""Quickstart: classify handwritten digits with `torchcallbacks.fit`, Keras style.

Uses scikit-learn's bundled digits data set (1,797 8x8 images, no download), trains a small MLP with
validation in seconds on two CPU cores. Along the way it shows the callbacks a Keras user expects:
a live progress bar, a one-cycle learning-rate schedule stepped per batch, an exponential moving
average (EMA) of the weights used for validation, early stopping that restores the best weights, the
best model saved as safetensors, a backup to resume from if the process is killed, TensorBoard logs
and a CSV that a resumed run continues.

Rerunning it: a run that was killed resumes from its backup (the CSV and the TensorBoard logs go on
where it stopped); after a run that finished (no backup left), the rerun is a fresh run that replaces
the previous run's files: CSVLogger rewrites its file (append=False, as Keras), and the script removes
the previous TensorBoard logs and best model itself, because TensorBoard would draw a second run's
event files in the same directory on top of the first and ModelCheckpoint only replaces files of its
own run. The paths of everything written are printed at the end.

Which weights are "the best": validation scores the EMA weights, so `swap_on_epoch=True` keeps them in
the model at each epoch end, where early stopping and the checkpoint read the model. Both therefore
keep the EMA weights of the best epoch, the very weights that `val_accuracy` measured. The test below
loads that file (also right after a resumed run) and scores it.

    pip install -e '.[examples]' && python examples/quickstart.py [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc


def accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred.argmax(dim=1) == y).float().mean()


accuracy.mode = "max"  # type: ignore[attr-defined]  # tells monitors that higher is better


def load_data(batch_size: int = 64) -> tuple[DataLoader, DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train, val, test = slice(0, 1200), slice(1200, 1500), slice(1500, None)
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
        DataLoader(TensorDataset(x[test], y[test]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a digits classifier with torchcallbacks.")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where logs and files go")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)

    train_loader, val_loader, test_loader = load_data()
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    # First in the list: validation uses the averaged weights, and with swap_on_epoch=True so do the
    # callbacks after it at epoch end (early stopping's best weights, the checkpoint).
    ema = tc.SwapEMAWeights(swap_on_epoch=True, decay=0.99)
    checkpoint = tc.ModelCheckpoint(args.out / "best-{epoch:02d}-{val_accuracy:.4f}.safetensors",
                                    monitor="val_accuracy", save_best_only=True, save_weights_only=True,
                                    max_to_keep=1)
    tensorboard = tc.TensorBoard(log_dir=args.out / "logs", histogram_freq=5)
    csv_logger = tc.CSVLogger(args.out / "training.csv")  # rewritten by a fresh run, continued by a resumed one
    backup = tc.BackupAndRestore(args.out / "backup")  # kill the script and rerun it: it resumes exactly
    resuming = Path(backup.latest_path).exists()
    if not resuming:
        # A fresh run replaces the previous run's files. TensorBoard shows the event files of one
        # directory as one run, so a second run's files beside the first's would overlap its curves.
        shutil.rmtree(tensorboard.log_dir, ignore_errors=True)
        for old_best in args.out.glob("best-*.safetensors"):
            old_best.unlink()
    print(f"Resuming the interrupted run from {backup.backup_dir}" if resuming else f"A fresh run in {args.out}")
    history = tc.fit(
        model,
        train_loader,
        optimizer=optimizer,
        loss=F.cross_entropy,
        metrics={"accuracy": accuracy},
        validation_data=val_loader,
        epochs=args.epochs,
        verbose=1,  # a live bar on a terminal or in a notebook; a line per epoch in a log
        callbacks=[
            ema,
            tc.LearningRateScheduler(
                torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.epochs * len(train_loader)),
                per_batch=True,
            ),
            tc.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True),
            tc.TerminateOnNaN(check_every=10),
            checkpoint,
            tensorboard,
            csv_logger,
            backup,
        ],
    )

    # Test the saved best model: the EMA weights of the epoch with the best val_accuracy.
    tc.load_weights(model, checkpoint.best_path)
    results = tc.evaluate(model, test_loader, loss=F.cross_entropy, metrics={"accuracy": accuracy},
                          return_dict=True, verbose=0)
    predictions = tc.predict(model, test_loader, verbose=0).argmax(dim=1)
    print(f"best val_accuracy: {max(history.history['val_accuracy']):.4f}")
    print(f"test loss: {results['loss']:.4f}  test accuracy: {results['accuracy']:.4f}")
    print(f"first test predictions: {predictions[:10].tolist()}")
    print("Files written:")
    print(f"  best model (weights):  {checkpoint.best_path}")
    print(f"  epoch logs (CSV):      {csv_logger.filename}")
    print(f"  TensorBoard logs:      {tensorboard.log_dir}   (view: tensorboard --logdir {tensorboard.log_dir})")
    print(f"  backup:                {backup.backup_dir}   (removed once a run finishes; a killed run resumes from it)")


if __name__ == "__main__":
    main()
