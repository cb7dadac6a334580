"""A finished batch's output and error lines, read into results as the online engine makes them.

An answer line (`response.status_code` 200) is parsed by the online client's own reader
(`transport/completions.answer_of`) and priced at batch prices; a line whose response is an
HTTP error gets the online error text and class (`transport/client.error_for_status`); a line
with no response (`batch_expired`, `batch_cancelled`, a failed batch) gets the gateway's
message. A retryable failure (429, 5xx, 408, 409, a body that is not an answer, a line the
batch never ran or never wrote) of a row submitted fewer than `max_attempts` times is not
recorded: the row goes into a following batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from batchrunner.engine.recorder import Recorder
from batchrunner.engine.shared import RunState
from batchrunner.errors import RequestError, RetryableError
from batchrunner.results import Result
from batchrunner.store.batches import BatchRows
from batchrunner.transport.client import error_for_status
from batchrunner.transport.completions import _error_object_message, answer_of

__all__ = ["LineReader", "RETRYABLE_CODES"]

#: Line errors with no response that another batch may cure.
RETRYABLE_CODES = frozenset({
    "batch_expired", "batch_cancelled", "timeout", "request_timeout", "server_error",
    "rate_limit_exceeded", "internal_error",
})


class LineReader:
    """The lines of one batch's output and error files, into the recorder."""

    def __init__(
        self, state: RunState, rows: BatchRows, expected: np.ndarray, batch_id: str,
        recorder: Recorder,
    ) -> None:
        self.state = state
        self.rows = rows
        self.expected = expected
        self.batch_id = batch_id
        self.recorder = recorder
        self.max_attempts = state.config.max_attempts
        self.seen = np.zeros(len(rows), dtype=bool)
        self.again = np.zeros(len(rows), dtype=bool)
        self._positions = {str(index): k for k, index in enumerate(rows.index.tolist())}
        self._ids = rows.ids.to_pylist()
        self._models = rows.model.to_pylist()
        self._input_hashes = rows.input_hash.to_pylist()
        self.cost = 0.0  # of the answers recorded
        self.answered = 0  # lines the gateway answered (ok or not)

    def _position(self, custom_id: Any) -> int | None:
        return self._positions.get(custom_id) if isinstance(custom_id, str) else None

    def read(self, line: Any) -> None:
        """One line of the output or error file."""
        if not isinstance(line, dict):
            return
        k = self._position(line.get("custom_id"))
        if k is None or self.seen[k]:
            return
        self.seen[k] = True
        if not self.expected[k]:  # its row has a result already, or changed since
            return
        response = line.get("response")
        if isinstance(response, dict):
            self.answered += 1
        result, retryable = self._result(k, response, line.get("error"))
        if retryable and int(self.rows.attempt[k]) < self.max_attempts:
            self.again[k] = True
            return
        self._keep(k, result)

    def finish(self, status: str, why: str | None = None) -> np.ndarray:
        """The rows with no line in either file: sent again, or failed after the last attempt
        (`why`: the failed batch's first error). Returns which lines go into a following batch."""
        missing = self.expected & ~self.seen
        text = f"the batch ended ({status}) without an answer for this row"
        if why:
            text += f": {why}"
        for k in np.flatnonzero(missing):
            if int(self.rows.attempt[k]) < self.max_attempts:
                self.again[k] = True
            else:
                self._keep(k, self._error(k, text, None))
        return self.again

    # -- results ---------------------------------------------------------------------------

    def _keep(self, k: int, result: Result) -> None:
        self.cost += result.cost_usd or 0.0
        input_hash = self._input_hashes[k]
        self.recorder.record(result, int(self.rows.row_hash[k]), input_hash)

    def _error(self, k: int, text: str, http_status: int | None) -> Result:
        return Result(
            index=int(self.rows.index[k]), id=self._ids[k], status="error",
            model=self._models[k], attempts=int(self.rows.attempt[k]),
            http_status=http_status, error=text, batch_id=self.batch_id,
        )

    def _result(self, k: int, response: Any, error: Any) -> tuple[Result, bool]:
        if isinstance(response, dict):
            status = response.get("status_code")
            body = response.get("body")
            if status == 200:
                try:
                    answer = answer_of(body, 200)
                except RequestError as exc:
                    return self._error(k, str(exc), 200), isinstance(exc, RetryableError)
                return self._ok(k, answer), False
            if isinstance(status, int):
                message = _error_object_message(body) or "no message"
                exc2 = error_for_status(status, message, orjson.dumps(body))
                retryable = isinstance(exc2, RetryableError)
                return self._error(k, str(exc2), status), retryable
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        text = f"{message or 'the batch gave no answer'}" + (f" ({code})" if code else "")
        return self._error(k, text, None), code is None or code in RETRYABLE_CODES

    def _ok(self, k: int, answer: Any) -> Result:
        usage = answer.usage
        model = self._models[k]
        cost = self.state.prices.cost(
            model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens or 0,
            batch=True,
        )
        return answer.result(
            index=int(self.rows.index[k]), id=self._ids[k], model=model, cost_usd=cost,
            attempts=int(self.rows.attempt[k]), batch_id=self.batch_id,
        )
