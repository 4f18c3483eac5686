"""The checks a command's result passes before it is written, with the runtime's session on a thread.

``validation.check_result`` runs them one after another; here the session (about a second of a
20,000-node graph, built by ONNX Runtime outside the GIL) overlaps the checker and the write.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Iterator, Optional

import onnx

from graphprune.errors import UserError
from graphprune.validation import check_attributes, check_deferred, check_finite, check_session

__all__ = ["result_check"]


@contextlib.contextmanager
def result_check(model: onnx.ModelProto, finite_checked: "frozenset[str]" = frozenset()) -> Iterator[Callable[[], None]]:
    """What a result must pass before it is written, with the runtime's session built on a thread.

    On entry: the attributes that crash kernels and the full checker (failing is our bug:
    ``PassContractError``), then finite weights.  The runtime builds the session outside the GIL
    (a second on 20,000 nodes) from the full check's weightless file once written, while the checker
    and the caller's block (its summary, the file written to its temporary place) run.  Yields
    ``verdict``: it waits for the session and raises what ``check_result`` would; call it before the
    write is committed (``model_io.save(before_commit=verdict)``); leaving the block calls it.

    Args:
        finite_checked: main-graph initializers whose values are the input's, found finite at the
            door (``validation.check_finite(checked=...)``): not read again.
    """
    from graphprune.model_io import check_model
    from graphprune.passes.base import PassContractError

    outcome: dict = {}
    threads: list = []

    def build(light: Optional[onnx.ModelProto], path: Optional[str]) -> None:
        try:
            check_session(model, light, path)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by verdict()
            outcome["error"] = exc

    def start(light: Optional[onnx.ModelProto] = None, path: Optional[str] = None) -> None:
        thread = threading.Thread(target=contextvars.copy_context().run, args=(build, light, path), daemon=True,
                                  name="graphprune-session-check")
        thread.start()
        threads.append(thread)

    def verdict() -> None:
        for thread in threads:
            thread.join()
        error = outcome.pop("error", None)
        if isinstance(error, UserError):
            check_deferred()  # an input the runtime refuses is the user's problem (see check_result)
        if error is not None:
            raise error

    try:
        try:
            check_attributes(model.graph)  # before anything parses the graph: some crash the inference
            check_model(model, full=True, on_written=start)
        except UserError as exc:
            raise PassContractError(f"refusing to write an invalid result: {exc}") from None
        if not threads:
            start()
        check_finite(model, what="result", checked=finite_checked)
        yield verdict
        verdict()
    finally:
        for thread in threads:
            thread.join()
