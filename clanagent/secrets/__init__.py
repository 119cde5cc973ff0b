"""secrets: secrets declared by services, generated on exactly one online
holder, sealed to every holder (and the admins, for recovery), gossiped as
records, written under the runtime dir, and rotated.

Sans-IO: `model`, `crypto`, `record`, `planner`; I/O: `generators` (incl.
the command sandbox), `files`; the trio shell: `service`; its control
methods: `api`.
"""

from .crypto import SecretsError, SecretsLocalError
from .generators import GeneratorError
from .model import SecretInstance, instances
from .record import ROTATE_KIND, SECRET_KIND

__all__ = [
    "GeneratorError",
    "ROTATE_KIND",
    "SECRET_KIND",
    "SecretInstance",
    "SecretsError",
    "SecretsLocalError",
    "instances",
]
