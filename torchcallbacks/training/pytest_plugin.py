"""The pytest plugin of torchcallbacks (registered as a `pytest11` entry point, so installing the
package makes it available): the `verify_resume` fixture.

Example:

```python
def test_my_pipeline_resumes_exactly(verify_resume):
    verify_resume(make_run, epochs=2)  # fails the test with the report when something differs
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from torchcallbacks.training.verify import ResumeReport
from torchcallbacks.training.verify import verify_resume as _verify_resume


@pytest.fixture
def verify_resume() -> Callable[..., ResumeReport]:
    """`torchcallbacks.verify_resume` that fails the test with the report's text when the resumed
    runs differ from the uninterrupted one, and returns the report otherwise.

    Example:

    ```python
    def test_resume(verify_resume):
        report = verify_resume(make_run, epochs=2, interrupt_at=[3, "epoch_end:1"])
        assert report.runs == 5
    ```
    """

    def check(
        make_run: Callable[[], Mapping[str, Any]], *, epochs: int, interrupt_at: Sequence[int | str] | None = None,
        sigkill: bool = False,
    ) -> ResumeReport:
        report = _verify_resume(make_run, epochs=epochs, interrupt_at=interrupt_at, sigkill=sigkill)
        if not report.ok:
            pytest.fail(str(report), pytrace=False)
        return report

    return check
