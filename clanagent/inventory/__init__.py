"""inventory: the clan's signed desired state.

`parse` (TOML and validation), `model` (typed views), `select` (what applies
to a machine), `diff`, `versions` (signed versions, history, head),
`merge` (concurrent edits), `sealing` (encrypted endpoints), `token` (join
tokens), `anchor` (the clan a node trusts before any version), `manager`
(the agent's view) and `views` (what the control API shows).
"""

from .anchor import Anchor, AnchorError, load_anchor, save_anchor
from .diff import Change, diff_docs, format_diff
from .manager import RECORD_KIND, InventoryManager
from .merge import Conflict, merge3
from .model import Inventory, doc_hash
from .parse import InventoryIssue, ParseResult, doc_to_toml, load_inventory_toml, validate_doc
from .sealing import SealError, open_doc_endpoints, reseal_doc
from .token import Token, TokenError, make_token, parse_token
from .versions import (
    HeadView,
    InventoryHistory,
    InventoryVersion,
    OfferResult,
    OfferStatus,
    Policy,
    TrustAnchor,
    make_version,
)

__all__ = [
    "Anchor",
    "AnchorError",
    "Change",
    "Conflict",
    "HeadView",
    "Inventory",
    "InventoryHistory",
    "InventoryIssue",
    "InventoryManager",
    "InventoryVersion",
    "OfferResult",
    "OfferStatus",
    "ParseResult",
    "Policy",
    "RECORD_KIND",
    "SealError",
    "Token",
    "TokenError",
    "TrustAnchor",
    "diff_docs",
    "doc_hash",
    "doc_to_toml",
    "format_diff",
    "load_anchor",
    "load_inventory_toml",
    "make_token",
    "make_version",
    "merge3",
    "open_doc_endpoints",
    "parse_token",
    "reseal_doc",
    "save_anchor",
    "validate_doc",
]
