"""wire: the format of everything that crosses a machine boundary.

Three layers, each on the one below:

* `codec`: canonical msgpack with hard limits (`pack`, `unpack`, `Limits`,
  `WireError`);
* `schema`: typed records, frozen dataclasses whose annotations are their
  schema (`Record`, `record_type`, `record_class`) -- the one validation
  engine for record bodies;
* `envelope`: signed records (`SignedRecord`), a canonical header signed
  with the origin's Ed25519 key.

Owns: re-exporting those layers' public names, so `from clanagent.wire import
X` is the one import every part uses.  Must never: hold logic of its own.
"""

from .codec import (
    DEFAULT_LIMITS,
    RECORD_LIMITS,
    Limits,
    WireError,
    pack,
    pack_plain,
    unpack,
    unpack_shallow,
)
from .envelope import (
    MAX_RECORD_VERSION,
    MAX_VERSION,
    RECORD_SIGNATURE_DOMAIN,
    SignedRecord,
    Signer,
)
from .schema import CheckedRecord, NodeInfo, Range, Record, Size, record_class, record_type

__all__ = [
    "WireError",
    "Limits",
    "DEFAULT_LIMITS",
    "RECORD_LIMITS",
    "pack",
    "pack_plain",
    "unpack",
    "unpack_shallow",
    "Record",
    "CheckedRecord",
    "Range",
    "Size",
    "record_type",
    "record_class",
    "NodeInfo",
    "Signer",
    "SignedRecord",
    "RECORD_SIGNATURE_DOMAIN",
    "MAX_VERSION",
    "MAX_RECORD_VERSION",
]
