"""inventory: the clan's signed desired state.

`parse` (TOML and validation), `model` (typed views), `select` (what applies
to a machine), `diff`, `versions` (signed versions, history, head),
`merge` (concurrent edits), `sealing` (encrypted endpoints), `token` (join
tokens), `anchor` (the clan a node trusts before any version), `manager`
(the agent's view), `views` (what the control API shows), `api` (its
control methods) and `edit` (the admin side: admin keys, sealing and
signing an edit, comparing edits).
"""

import importlib

# Names load on first use, so `import clanagent.inventory.x` stays cheap (clanctl
# starts in milliseconds instead of importing trio and every part).
_WHERE = {
    "Anchor": "anchor",
    "AnchorError": "anchor",
    "Change": "diff",
    "Conflict": "merge",
    "HeadView": "versions",
    "Inventory": "model",
    "InventoryHistory": "versions",
    "InventoryIssue": "parse",
    "InventoryManager": "manager",
    "InventoryVersion": "versions",
    "OfferResult": "versions",
    "OfferStatus": "versions",
    "ParseResult": "parse",
    "Policy": "versions",
    "RECORD_KIND": "manager",
    "SealError": "sealing",
    "Token": "token",
    "TokenError": "token",
    "TrustAnchor": "versions",
    "diff_docs": "diff",
    "doc_hash": "model",
    "doc_to_toml": "parse",
    "format_diff": "diff",
    "load_anchor": "anchor",
    "load_inventory_toml": "parse",
    "make_token": "token",
    "make_version": "versions",
    "merge3": "merge",
    "open_doc_endpoints": "sealing",
    "parse_token": "token",
    "reseal_doc": "sealing",
    "save_anchor": "anchor",
    "validate_doc": "parse",
}

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


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
