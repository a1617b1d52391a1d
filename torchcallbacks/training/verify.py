"""`verify_resume`: proves that a user's own pipeline resumes exactly, or names the first thing that
does not.

It trains the pipeline once without interruption, then, for each interruption point, once up to that
point (with a `BackupAndRestore` of its own) and once more from the backup, as a rerun after a crash
would, each run built afresh by `make_run()`. `resume_recorder.StepRecorder` records every step of
every run; the resumed one must match the uninterrupted one at every step.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchcallbacks.callbacks.backup_and_restore import BackupAndRestore
from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.checkpoint.encoding import from_json, to_json
from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checks import check_count
from torchcallbacks.distributed import all_gather_json, barrier, is_distributed, is_main_process
from torchcallbacks.training.fingerprint import DataOrderWarning
from torchcallbacks.training.fit import fit
from torchcallbacks.training.resume_recorder import Interrupt, Interrupted, Kill, Step, StepRecorder

#: What every comparison covers, as the report says it.
COMPARED = (
    "each step's model inputs (the data order and its augmentation), the model's tensors, every optimizer "
    "state entry and the global random states after each step, each callback's public attributes, the "
    "epoch logs, and at the end the model, optimizers, GradScaler and tracked schedulers"
)


@dataclass
class Interruption:
    """One interruption point and what its resumed run did.

    Attributes:
        point: where the run was interrupted, in words.
        difference: the first difference from the uninterrupted run, in words; None when none.
    """

    point: str
    difference: str | None = None


@dataclass
class ResumeReport:
    """What `verify_resume` compared and found.

    Attributes:
        epochs: the epochs of every run.
        steps: the training steps of the uninterrupted run.
        runs: the runs of `fit` made (one uninterrupted, two per interruption point).
        interruptions: one entry per interruption point.
    """

    epochs: int
    steps: int
    runs: int
    interruptions: list[Interruption] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every resumed run matched the uninterrupted one."""
        return all(i.difference is None for i in self.interruptions)

    def __str__(self) -> str:
        head = (
            f"verify_resume: {'OK' if self.ok else 'FAILED'}: {len(self.interruptions)} interrupted and resumed "
            f"run(s) against an uninterrupted one ({self.epochs} epochs, {self.steps} steps; {self.runs} runs of fit). "
            f"Compared: {COMPARED}."
        )
        lines = [head]
        for interruption in self.interruptions:
            lines.append(f"- {interruption.point}: {interruption.difference or 'the same at every step'}")
        return "\n".join(lines)


def _point(value: Any, total: int, epochs: int) -> tuple[str, int]:
    """`interrupt_at`'s item as (kind, at): an int n or "step:n" (after global step n), "async:n"
    (the same with an asynchronous backup in flight), "epoch_end:e" or "validation:e" (1-based e)."""
    kind, at = ("step", value) if isinstance(value, int) and not isinstance(value, bool) else (None, None)
    if isinstance(value, str) and value.count(":") == 1:
        kind, number = value.split(":")
        at = int(number) if number.isdigit() else None
    if kind in ("step", "async") and isinstance(at, int) and 1 <= at < total:
        return kind, at
    if kind in ("epoch_end", "validation") and isinstance(at, int) and 1 <= at <= epochs:
        return kind, at - 1
    raise ValueError(
        f"interrupt_at: expected global steps 1..{total - 1} (an int, 'step:n' or 'async:n') or 1-based epochs "
        f"1..{epochs} ('epoch_end:e', 'validation:e'), received {value!r}"
    )


def _describe(kind: str, at: int, steps_per_epoch: int) -> str:
    if kind in ("step", "async"):
        epoch, batch = divmod(at - 1, steps_per_epoch)
        where = f"after step {at} (batch {batch + 1} of epoch {epoch + 1})"
        return where + (", its backup written asynchronously" if kind == "async" else "")
    if kind == "epoch_end":
        return f"at the end of epoch {at + 1}, after its backup"
    return f"inside the validation of epoch {at + 1}"


def _defaults(steps_per_epoch: int, epochs: int, validates: bool) -> list[str | int]:
    """Mid-epoch, at an epoch end, inside validation and with an asynchronous save in flight."""
    total = steps_per_epoch * epochs
    points: list[str | int] = [max(1, steps_per_epoch // 2)]
    if epochs >= 2:
        points.append("epoch_end:1")
        if validates:
            points.append("validation:2")
        points.append(f"async:{steps_per_epoch + max(1, steps_per_epoch // 2)}")
    elif total > 2:
        points.append(f"async:{total - 1}")
    return [p for i, p in enumerate(points) if p not in points[:i]]


class _Runner:
    """Builds and runs the user's pipeline: `make_run()`'s arguments to `fit`, with our callbacks."""

    def __init__(self, make_run: Callable[[], Mapping[str, Any]], epochs: int) -> None:
        self.make_run, self.epochs, self.runs = make_run, epochs, 0
        self.data_warnings: list[str] = []  # the DataOrderWarnings of the last run (its resume's)

    def __call__(self, extra: Sequence[Callback], interrupted: bool = False, stream: str | None = None) -> StepRecorder:
        """One run with the `extra` callbacks; with `interrupted`, one that must end in `Interrupted`;
        with `stream`, its records also go to that file as they are made (see `StepRecorder`)."""
        run = self.make_run()
        if not isinstance(run, Mapping):
            raise TypeError(f"make_run: expected it to return a dict of fit's arguments, received {type(run).__name__}")
        run = dict(run)
        if "epochs" in run:
            raise ValueError("make_run: leave 'epochs' out of the dict; verify_resume(epochs=...) sets it")
        callbacks = list(run.pop("callbacks", None) or [])
        if any(isinstance(c, BackupAndRestore) for c in callbacks):
            raise ValueError("make_run: leave BackupAndRestore out of the callbacks; verify_resume adds its own")
        recorder = StepRecorder(callbacks, stream=stream)
        run.setdefault("verbose", 0)
        self.runs += 1
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DataOrderWarning)
                try:
                    fit(**run, epochs=self.epochs, callbacks=[*callbacks, *extra, recorder])
                finally:
                    self.data_warnings = [str(w.message) for w in caught if issubclass(w.category, DataOrderWarning)]
            for w in caught:  # the others, as they would have been shown (ours go into the report)
                if not issubclass(w.category, DataOrderWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        except Interrupted:
            if interrupted:
                return recorder
            raise
        if interrupted:
            raise RuntimeError("verify_resume: the run ended before the point it was to be interrupted at")
        return recorder


def verify_resume(
    make_run: Callable[[], Mapping[str, Any]],
    *,
    epochs: int,
    interrupt_at: Sequence[int | str] | None = None,
    sigkill: bool = False,
) -> ResumeReport:
    """Check that a pipeline resumes exactly: an uninterrupted run against runs interrupted at each
    point of `interrupt_at` and resumed through `BackupAndRestore`, compared at every step.

    `make_run()` returns what the pipeline passes to `fit` (`model`, `x`, `optimizer`, `loss`,
    `callbacks`, ... as fit names them, without `epochs` and without a `BackupAndRestore`), built
    afresh at each call, seeded as the user's script seeds it: a rerun after a crash builds it again
    the same way. Each interrupted run backs up after every step (at epoch ends for "epoch_end:e")
    into a temp directory, is stopped by an exception at its point, and a fresh `make_run()` resumes
    from the backup. The first difference found is named with its step and what differed (the
    inputs, an optimizer state entry, a model tensor, a random state, a callback attribute that its
    `state_dict` does not return, the logs), which points at what is not saved or not seeded. When
    the resume itself warned that the data order differs (`DataOrderWarning`: the backup's
    fingerprint of the data), what it said is added.

    It makes 1 + 2 x len(interrupt_at) runs of `fit` (9 with the default points) and digests every
    tensor of the model and optimizers after every step: give it a small configuration (a few
    epochs of a few batches) of the real pipeline.

    Args:
        make_run: returns fit's arguments for one run (a dict), built afresh.
        epochs: epochs of every run.
        interrupt_at: where to interrupt: global steps (an int or "step:n", 1-based), "async:n" (at
            step n with the backup written asynchronously), "epoch_end:e" (after epoch e's end and
            its backup, 1-based), "validation:e" (inside epoch e's validation). None: mid-epoch 1,
            at the end of epoch 1, inside the validation of epoch 2 (when there is validation
            data) and mid-epoch 2 with an asynchronous backup.
        sigkill: run each interrupted run in a new Python process and kill it with SIGKILL at its point
            (no hook runs after; an asynchronous backup may be cut mid-write, and the rerun then
            resumes from the backup before it), instead of raising an exception in this process.
            `make_run` must then be a module-level function the new process can import.

    Returns:
        A `ResumeReport`: `report.ok`, and `str(report)` says what was compared and found.

    Example:

    ```python
    def make_run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        return {"model": model, "x": loader, "optimizer": torch.optim.Adam(model.parameters()),
                "loss": torch.nn.functional.mse_loss, "callbacks": [torchcallbacks.EarlyStopping()]}

    report = torchcallbacks.verify_resume(make_run, epochs=3)
    assert report.ok, str(report)
    ```
    """
    epochs = check_count(epochs, "epochs", minimum=1)
    target = _importable(make_run) if sigkill else None
    runner = _Runner(make_run, epochs)
    reference = runner([])
    total = max(reference.steps, default=0)
    if total < 2:
        raise ValueError(f"verify_resume: the uninterrupted run trained {total} step(s); it needs 2 or more to interrupt")
    steps_per_epoch = sum(1 for step in reference.steps.values() if step.epoch == 0)
    validates = any(k.startswith("val_") for logs in reference.epoch_logs.values() for k in logs)
    given = _defaults(steps_per_epoch, epochs, validates) if interrupt_at is None else list(interrupt_at)
    points = [_point(p, total, epochs) for p in given]
    report = ResumeReport(epochs=epochs, steps=total, runs=0)
    for kind, at in points:
        interruption = Interruption(_describe(kind, at, steps_per_epoch))
        with _shared_directory() as directory:
            save_freq: str | int = "epoch" if kind == "epoch_end" else 1
            backups = os.path.join(directory, "backup")
            if target is not None:
                first = _killed(runner, target, directory, save_freq, kind, at, interruption.point)
            else:
                first = _interrupted(runner, backups, save_freq, kind, at)
            second = runner([BackupAndRestore(backups, save_freq=save_freq)])
        interruption.difference = _compare(reference, first, second, kind, at)
        if interruption.difference is not None and runner.data_warnings:  # what the resume itself saw
            said = re.sub(r" from the one saved in (['\"]).*?\1", "", runner.data_warnings[0], count=1)
            interruption.difference += f"; the resume warned (DataOrderWarning): {said}"
        report.interruptions.append(interruption)
    report.runs = runner.runs
    return report


@contextlib.contextmanager
def _shared_directory() -> Iterator[str]:
    """A temp directory for the backups, the same one on every process (process 0 makes it and
    removes it once every process is done with it)."""
    made = tempfile.mkdtemp(prefix="verify_resume-") if is_main_process() else None
    directory = all_gather_json(made)[0]
    try:
        yield directory
    finally:
        barrier()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _interrupted(runner: _Runner, directory: str, save_freq: str | int, kind: str, at: int) -> StepRecorder:
    backup = BackupAndRestore(directory, save_freq=save_freq, async_save=kind == "async")
    return runner([backup, Interrupt("step" if kind == "async" else kind, at)], interrupted=True)


def _importable(make_run: Any) -> tuple[str, str]:
    """(module, qualified name) a new process imports `make_run` by."""
    module, name = getattr(make_run, "__module__", None), getattr(make_run, "__qualname__", "")
    if is_distributed():
        raise ValueError("verify_resume: sigkill=True is for a single process (under torchrun, interrupt with exceptions)")
    if not isinstance(module, str) or module == "__main__" or not name or "<" in name:
        raise ValueError(
            f"verify_resume: sigkill=True runs make_run in a new process, so it must be a module-level function "
            f"importable there; received {make_run!r} (module {module!r})"
        )
    return module, name


def _killed(
    runner: _Runner, target: tuple[str, str], directory: str, save_freq: str | int, kind: str, at: int, point: str
) -> StepRecorder:
    """The interrupted run in a new process (`python -m torchcallbacks.training.verify`), killed with
    SIGKILL at its point; its records, streamed to a file as they were made."""
    stream = os.path.join(directory, "steps.jsonl")
    spec = {"module": target[0], "name": target[1], "epochs": runner.epochs, "directory": os.path.join(directory, "backup"),
            "save_freq": save_freq, "kind": kind, "at": at, "stream": stream,
            "rng": to_json(capture_rng_state())}  # it starts from this process's random states, as a run here would
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    runner.runs += 1
    done = subprocess.run([sys.executable, "-m", "torchcallbacks.training.verify", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"verify_resume: the run in a new process was to be killed {point} but ended with status "
            f"{done.returncode}: {done.stderr[-2000:]}"
        )
    return StepRecorder.read_stream(stream)


def _child(spec: Mapping[str, Any]) -> None:
    """The killed process's part: the interrupted run, streaming its records, killed at its point."""
    restore_rng_state(from_json(spec["rng"]))
    make_run: Any = importlib.import_module(spec["module"])
    for part in spec["name"].split("."):
        make_run = getattr(make_run, part)
    runner = _Runner(make_run, spec["epochs"])
    kind, at = spec["kind"], spec["at"]
    backup = BackupAndRestore(spec["directory"], save_freq=spec["save_freq"], async_save=kind == "async")
    runner([backup, Kill("step" if kind == "async" else kind, at)], stream=spec["stream"])


# -- comparing -----------------------------------------------------------------------------------------
def _first(a: Mapping[str, str], b: Mapping[str, str]) -> str | None:
    """The first key whose digests differ (or that one side lacks)."""
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            return key
    return None


def _callback_difference(ref: Step, got: Step, saved_keys: Mapping[str, set[str]], when: str) -> str | None:
    for name, attributes in ref.callbacks.items():
        other = got.callbacks.get(name, {})
        # attributes of plain data on both sides (a handle set in one run only, e.g. a file's
        # writer opened at the first epoch end, is no state)
        attribute = _first({k: v for k, v in attributes.items() if k in other}, {k: v for k, v in other.items() if k in attributes})
        if attribute is None:
            continue
        label = name.split(":", 1)[1]
        if attribute not in saved_keys.get(name, set()):
            return (f"callback {label} has state that its state_dict does not return (attribute `{attribute}`): "
                    f"it differs {when}")
        return f"callback {label}'s state `{attribute}` differs {when}"
    return None


def _state_difference(ref: Step, got: Step, when: str) -> str | None:
    """The first model tensor that differs, else the first optimizer state entry (a step that
    computed other gradients changes both: the model is named)."""
    key = _first(ref.model, got.model)
    if key is not None:
        return f"model tensor `{key}` differs {when}"
    key = _first(ref.optimizers, got.optimizers)
    if key is not None:
        return f"optimizer state `{key}` differs {when}"
    return None


def _compare(reference: StepRecorder, first: StepRecorder, second: StepRecorder, kind: str, at: int) -> str | None:
    resumed_from = min(second.steps, default=max(first.steps) + 1) - 1
    for step in sorted(first.steps):
        if step > resumed_from:
            break
        ref, got = reference.steps[step], first.steps[step]
        if ref.inputs != got.inputs or ref.model != got.model or ref.optimizers != got.optimizers:
            return (f"the run differs from the uninterrupted one before it was interrupted (at step {step}): make_run() "
                    "does not build the same run twice (seed torch, numpy and random in it, and build every generator "
                    "and the data there)")
    keys = {**reference.saved_keys, **second.saved_keys}
    if second.restored is not None:  # the state right after the restore phase against the state saved
        saved = reference.epoch_ends.get(at) if kind == "epoch_end" else reference.steps.get(resumed_from)
        if saved is not None:
            when = f"right after the resume from step {resumed_from}"
            found = _callback_difference(saved, second.restored, keys, when) or _state_difference(saved, second.restored, when)
            if found:
                return found + " (restored wrong, or not saved)"
    merged = {**{s: v for s, v in first.steps.items() if s <= resumed_from}, **second.steps}
    previous: Step | None = None
    for step in sorted(reference.steps):
        ref, maybe = reference.steps[step], merged.get(step)
        if maybe is None:
            return f"step {step} (batch {ref.batch + 1} of epoch {ref.epoch + 1}) was not trained after the resume"
        got = maybe
        where = f"batch {ref.batch + 1} of epoch {ref.epoch + 1} (step {step})"
        if ref.inputs != got.inputs:
            before = merged.get(step - 1)
            same_random = previous is not None and before is not None and previous.rng == before.rng
            cause = (" although the global random states were the same: the data changed, or it drew from something "
                     "that is not saved (a torch.Generator, a sampler or a dataset of its own: give it a state_dict, or "
                     "draw from the global generators)") if same_random else ""
            return f"{where} got other inputs (other samples, or the same ones augmented differently){cause}"
        found = _callback_difference(ref, got, keys, f"after step {step}")
        if found:
            return found
        found = _state_difference(ref, got, f"after step {step}")
        if found:
            return found + (" although the step's inputs and the state before it were the same: the forward pass drew "
                            "random numbers that are not saved (e.g. dropout drawing from a torch.Generator of its own)")
        key = _first(ref.rng, got.rng)
        if key is not None:
            return f"the global random state `{key}` differs after step {step}"
        previous = ref
    extra = sorted(s for s in merged if s not in reference.steps)
    if extra:
        return f"the resumed run trained more steps than the uninterrupted one (step {extra[0]} on)"
    for epoch, logs in reference.epoch_logs.items():
        got_logs = {**first.epoch_logs, **second.epoch_logs}.get(epoch)
        if got_logs != logs:
            return f"the logs of epoch {epoch + 1} differ: {logs} uninterrupted, {got_logs} resumed"
    key = _first(reference.final, second.final)
    if key is not None:
        return f"the final `{key}` state differs"
    return None


if __name__ == "__main__":  # the process `verify_resume(sigkill=True)` starts and kills
    _child(json.loads(sys.argv[1]))
