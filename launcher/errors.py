"""Errors the user can fix. The CLI turns these into a message and exit code 2."""


class ExportError(RuntimeError):
    """An exported model failed its checks: missing tensors or logits that differ."""


class UserInputError(Exception):
    """Bad recipe, data or arguments. ``where`` is a field path or ``file:line``."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message

    def __reduce__(self):
        # Raised in a Ray worker, it crosses to the driver by pickle, which by default
        # re-calls __init__ with the one formatted argument.
        return type(self), (self.where, self.message)
