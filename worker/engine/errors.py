"""Errors the engine raises for bad input. The service maps them to 422 problem+json."""
from __future__ import annotations


class InputError(ValueError):
    """The user's model, history, data or config cannot be used.

    ``code`` is short and stable (clients switch on it); ``message`` says what was wrong and
    ``hint`` how to fix it.
    """

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class UnsupportedOp(InputError):
    def __init__(self, op: str, where: str = "") -> None:
        super().__init__(
            "unsupported_op",
            f"the model uses the operation {op!r}{' at ' + where if where else ''}, which DARE's "
            "graph analysis does not support",
            "supported: Conv2d, Linear, BatchNorm, ReLU/LeakyReLU/ELU/GELU/Tanh/Sigmoid, max/average/"
            "adaptive pooling, flatten/reshape, dropout and residual additions",
        )
        self.op = op


class Cancelled(Exception):
    """Raised between batches when the job was cancelled."""
