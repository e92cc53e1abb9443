"""One root error type; every user-facing failure is a subclass with a message that names the fix."""


class FedtuneError(Exception):
    """Root of every error fedtune raises on purpose. The CLI prints these as one line."""


class ConfigError(FedtuneError):
    """A configuration value is missing, of the wrong type, or cannot work with the others."""


class DataError(FedtuneError):
    """A data source is missing, malformed, or too small for the requested run."""


class ModelError(FedtuneError):
    """A model cannot be found or loaded."""


class PkiError(FedtuneError):
    """A certificate or key is missing, invalid, or would be overwritten."""


class TrackingError(FedtuneError):
    """An experiment tracker (TensorBoard, MLflow) could not record what the run gave it."""


class StateError(FedtuneError):
    """The server's state file is missing, from another run, or inconsistent."""


class Refusal(FedtuneError):
    """A participant's message was refused: `kind` names it in the metrics (`refused_messages`), `detail`
    says what was wrong. Raised by the round engine and the coordinator on plain types; a transport maps
    `kind` to its own status (the gRPC edge: `transport.status`)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
