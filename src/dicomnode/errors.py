"""The node's one exception tree.

Third-party exceptions are re-raised as one of these at the boundary where they
are caught (``raise ... from exc``); nothing here is logged and re-raised.
Messages never carry patient data: they name attributes, pseudonymous keys and
file names under the data directory, never values read from a dataset.

::

    NodeError
     ├── ConfigError                 invalid configuration; the CLI prints it on one line, exit 2
     ├── StorageError                file or database write failed   -> C-STORE 0xA700
     ├── DatasetError                incoming object unusable -> C-STORE 0xC210/0xC220/0xA900
     ├── DeidentificationError       an object cannot be de-identified safely (-> quarantine)
     │    └── ReidentificationError  an outgoing object would leak a pseudonym or marker
     ├── VaultError                  the identity vault cannot be read or written
     ├── ModelError                  a model package is invalid or cannot run
     │    └── ModelLoadError         metadata disagrees with the ONNX graph, bad checksum
     ├── InferenceError              a study cannot be turned into model input (reason stored)
     ├── SendError                   delivery to a peer failed (retried, then dead letter)
     │    └── DeliveryRefused        the peer refused it for good (4xx): dead letter at once
     └── JobError                    the queue cannot accept or run a job
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError, ValueError):
    """The configuration is invalid. ``str(exc)`` is one line naming the key."""


class StorageError(NodeError, OSError):
    """Writing to the spool, archive or database failed; maps to C-STORE 0xA700."""


class DatasetError(NodeError, ValueError):
    """An incoming object cannot be used.

    Parameters
    ----------
    message
        What is wrong, naming the attribute (never its value).
    status
        The C-STORE failure status to answer: 0xC210 (cannot decode),
        0xC220 (required UID missing or invalid), 0xA900 (does not match SOP class).
    """

    def __init__(self, message: str, status: int = 0xC210) -> None:
        super().__init__(message)
        self.status = status


class DeidentificationError(NodeError):
    """An object cannot be de-identified safely; it is quarantined, never stored as clean."""


class ReidentificationError(DeidentificationError):
    """An outgoing object still carries a pseudonym or a de-identification marker."""


class VaultError(NodeError):
    """The identity vault cannot be read, decrypted or written."""


class ModelError(NodeError):
    """A model package is invalid or cannot run."""


class ModelLoadError(ModelError):
    """A model package's metadata disagrees with its ONNX graph or checksum."""


class ImportRefused(ModelError):
    """A model from another ecosystem (nnU-Net results, MONAI bundle) cannot be imported
    as it is; the message names what cannot be mapped and why."""


class InferenceError(NodeError):
    """A study cannot be turned into model input; the reason is stored on the study."""


class SendError(NodeError):
    """Delivery to a peer (C-STORE, STOW-RS, MLLP) failed; the outbox retries it, then
    dead-letters it."""


class DeliveryRefused(SendError):
    """The peer refused the object and would refuse it again (an HTTP 4xx, a STOW-RS
    failure for the instance): dead-lettered at once with the peer's reason."""


class JobError(NodeError):
    """The job queue cannot accept or run a job."""
