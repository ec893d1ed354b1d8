"""The one error type users can cause, and its exit codes.

Every error a user can provoke (bad file, unsupported op, impossible option, unknown target,
unwritable output, numeric mismatch) is a ``SparsecError`` subclass. The CLI prints its message
on one line and exits with the subclass's ``exit_code``; anything else is a bug in sparsec.
"""

from __future__ import annotations


class SparsecError(Exception):
    """Base class: a problem with the user's input, not a bug. Message is one line."""

    exit_code = 1
    kind = "error"


class InputNotFoundError(SparsecError):
    exit_code = 3
    kind = "input not found"


class InvalidModelError(SparsecError):
    exit_code = 4
    kind = "invalid model"


class UnsupportedOpError(SparsecError):
    exit_code = 5
    kind = "unsupported model"

    def __init__(self, ops: dict[str, int]):
        self.ops = dict(sorted(ops.items()))
        listed = ", ".join(f"{op} (x{n})" for op, n in self.ops.items())
        super().__init__(f"{len(self.ops)} unsupported op type(s): {listed}")


class BadOptionError(SparsecError):
    exit_code = 6
    kind = "bad option"


class DynamicShapeError(SparsecError):
    exit_code = 7
    kind = "dynamic shape"


class UnknownTargetError(SparsecError, ValueError):
    exit_code = 8
    kind = "unknown target"


class OutputError(SparsecError):
    exit_code = 9
    kind = "cannot write output"


class ValidationError(SparsecError):
    exit_code = 10
    kind = "validation failed"


class ToolchainError(SparsecError):
    """A compiler or tool the target needs (a cross compiler, CMake, ...) is not installed."""

    exit_code = 11
    kind = "missing toolchain"


class DeviceUnreachableError(SparsecError):
    """No remote device to run on: the RPC tracker cannot be reached, no server is registered
    under the key, or none became free in time."""

    exit_code = 12
    kind = "device unreachable"


class RemoteError(SparsecError):
    """A remote device failed during the run (its server dropped out) and no other could
    finish the work."""

    exit_code = 13
    kind = "remote device failed"


EXIT_CODES = {cls.__name__: cls.exit_code for cls in SparsecError.__subclasses__()}
