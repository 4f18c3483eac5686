"""Error types that separate bad input (exit code 2) from internal failures (exit code 1)."""

__all__ = ["GraphpruneError", "UserError"]


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class UserError(GraphpruneError):
    """The request or the input is wrong: the CLI prints the message on one line and exits 2.

    Messages name the problem and the thing at fault, e.g.
    ``model.onnx: not an ONNX model (protobuf parse failed)``.
    """
