"""The console's guided edits: add a machine, remove one, apply a service to tags.

Owns: the `console.machine_add_*`, `console.machine_remove_*` and
`console.service_*` methods (web sessions only).  Each pair is a preview and
an apply over one pure function of (the current document, the form): the
preview shows the new document's diff and what follows from it, computed by
the code the agents run (`inventory/select.py` for roles and VM placement,
`secrets/model.py` for who holds which secret, `services/wiring.py` for
imports); the apply rebuilds the same document from the same form and signs
it only when the head is still the one the preview was computed on and the
change is byte for byte the one it showed (`digest`).  Field errors name the
field they belong to, so the page shows them where they happen.
Signing and submitting are `actions.py`'s (`ConsoleActions.sign_and_submit`,
`inventory/edit.py` underneath), the join token is `invite`'s, the QR code
is segno's (SVG text, made here: nothing is fetched by the page).
Must never: sign a document whose preview was not shown, on a head that
moved, or with errors; remove the machine this console runs on.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from ..control.api import handler
from ..control.protocol import ControlError, ErrorCode
from ..inventory import edit
from ..wire import pack
from .actions import ConsoleActions, api_call, check_head

__all__ = [
    "GuidedEdits",
    "add_machine_doc",
    "digest_of",
    "remove_machine_doc",
    "removal_consequences",
    "service_doc",
    "service_preview",
]

MAX_TAGS = 64
MAX_ROLES = 64


class FormError(Exception):
    """Errors in a form, by field ("name", "key", "tags", "roles.server.tags", ...)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


def digest_of(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What a preview showed, as a short hash: the changes from `old` to `new`."""
    changes = [(c.kind, c.path, c.old, c.new) for c in edit.changes(old, new)]
    return hashlib.blake2b(pack(changes), digest_size=16).hexdigest()


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    from ..inventory.diff import format_diff

    changes = edit.changes(old, new)
    return {
        "changes": [{"kind": c.kind, "path": c.path, "old": c.old, "new": c.new} for c in changes],
        "diff": format_diff(changes),
        "digest": digest_of(old, new),
    }


def _names(value: Any, field: str, errors: dict[str, str], limit: int = MAX_TAGS) -> list[str]:
    from ..inventory.parse import NAME_RE

    if value is None:
        return []
    if not isinstance(value, list) or len(value) > limit:
        errors[field] = f"expected a list of at most {limit} names"
        return []
    out = []
    for v in value:
        if not isinstance(v, str) or not NAME_RE.fullmatch(v):
            errors[field] = f"{str(v)[:40]!r} is not a name (a-z, 0-9 and '-', up to 63)"
            return []
        out.append(v)
    return sorted(set(out))


def _doc_issues(doc: dict[str, Any], errors: dict[str, str], field: str) -> None:
    from ..inventory.parse import validate_doc

    for issue in validate_doc(doc):
        errors.setdefault(field, str(issue).replace("<doc>: ", ""))


# -- add a machine ------------------------------------------------------------------


def add_machine_doc(doc: dict[str, Any], name: Any, tags: Any, key: Any) -> dict[str, Any]:
    """`doc` with machine `name` added; FormError names each bad field."""
    from ..identity import IdentityError, parse_machine_key
    from ..inventory.parse import NAME_RE

    errors: dict[str, str] = {}
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        errors["name"] = "a machine name is a-z, 0-9 and '-', starting with a letter or digit"
    elif name in doc["machines"]:
        errors["name"] = f"'{name}' is already a machine of this clan"
    tag_list = _names(tags, "tags", errors)
    keys: tuple[bytes, bytes, bytes] | None = None
    if not isinstance(key, str) or not key.strip():
        errors["key"] = "paste the 'machine key' line that 'clanagent keygen' printed on it"
    else:
        try:
            keys = parse_machine_key(key)
        except IdentityError as exc:
            errors["key"] = str(exc)
    if keys is not None:
        for other, m in sorted(doc["machines"].items()):
            if keys[0] == m["node_key"] or keys[1] == m["box_key"] or keys[2] == m["wg_key"]:
                errors["key"] = f"this is the key of machine '{other}', already in the clan"
                break
    if errors:
        raise FormError(errors)
    new = copy.deepcopy(doc)
    assert keys is not None and isinstance(name, str)
    new["machines"][name] = {
        "node_key": keys[0],
        "box_key": keys[1],
        "wg_key": keys[2],
        "tags": tag_list,
        "endpoints": [],
        "sealed_endpoints": b"",
        "public": "no-public" not in tag_list,
    }
    _doc_issues(new, errors, "name")
    if errors:
        raise FormError(errors)
    return new


def _machine_gets(doc: dict[str, Any], name: str) -> dict[str, Any]:
    from ..inventory.select import roles_of, vms_for
    from ..secrets.model import instances_held_by
    from ..services.wiring import imports_for

    return {
        "roles": [f"{s}.{r}" for s, r in roles_of(doc, name)],
        "vms": vms_for(doc, name),
        "secrets": [i.id for i in instances_held_by(doc, name)],
        "imports": sorted({imp for _, _, imp in imports_for(doc, name)}),
    }


# -- remove a machine ---------------------------------------------------------------


def remove_machine_doc(doc: dict[str, Any], name: Any, me: str) -> dict[str, Any]:
    """`doc` without machine `name`, nor the roles and VMs that name it."""
    if not isinstance(name, str) or name not in doc["machines"]:
        raise FormError({"name": f"no machine {str(name)[:64]!r} in the inventory"})
    if name == me:
        raise FormError(
            {
                "name": f"'{name}' runs this console: remove it from another machine's console "
                "(or with clanctl there)"
            }
        )
    if len(doc["machines"]) == 1:
        raise FormError({"name": "the last machine of a clan cannot be removed"})
    new = copy.deepcopy(doc)
    del new["machines"][name]
    for svc in new["services"].values():
        for role in svc["roles"].values():
            role["machines"] = [m for m in role["machines"] if m != name]
    for vm in new["vms"].values():
        vm["machines"] = [m for m in vm["machines"] if m != name]
    errors: dict[str, str] = {}
    _doc_issues(new, errors, "name")
    if errors:
        raise FormError(errors)
    return new


def removal_consequences(
    old: dict[str, Any], new: dict[str, Any], name: str, online: bool
) -> list[dict[str, str]]:
    """What follows from removing `name`, one line each: {"kind", "text"}."""
    from ..inventory.select import machines_for, placement, roles_of, vms_for
    from ..secrets.model import holders, instances_held_by

    out = [
        {
            "kind": "sessions",
            "text": (
                f"{name} is online now: every machine closes its sessions with it and "
                "refuses it from now on"
                if online
                else f"{name} is not online: every machine refuses it from now on"
            ),
        },
        {"kind": "mesh", "text": f"every machine drops {name} from its WireGuard peers"},
    ]
    for inst in instances_held_by(old, name):
        others = [m for m in holders(new, inst.service, inst.secret, inst.scope_id)]
        if others:
            out.append(
                {
                    "kind": "secret",
                    "text": f"secret {inst.id} is rotated: a new generation for "
                    f"{', '.join(others)} only ({name} held the old one)",
                }
            )
        else:
            out.append({"kind": "secret", "text": f"secret {inst.id} is no longer kept by anyone"})
    for vm in vms_for(old, name):
        after = placement(new, vm)
        before = placement(old, vm)
        moved = [m for m in after if m not in before]
        text = (
            f"VM {vm} is stopped on {name} and started on {', '.join(moved)}"
            if moved
            else f"VM {vm} is stopped on {name}"
            + ("" if after else " and runs nowhere (no other machine matches)")
        )
        out.append({"kind": "vm", "text": text})
    for service, role in roles_of(old, name):
        decl = old["services"][service]["roles"][role]
        left = machines_for(new, decl["machines"], decl["tags"])
        if decl["exports"]:
            consumers = _importers(old, f"{service}.{role}")
            out.append(
                {
                    "kind": "export",
                    "text": f"{name}'s exports of {service}.{role} "
                    f"({', '.join(decl['exports'])}) are withdrawn"
                    + (f" from {', '.join(consumers)}" if consumers else ""),
                }
            )
        if not left:
            out.append({"kind": "role", "text": f"role {service}.{role} is left with no machine"})
    return out


def _importers(doc: dict[str, Any], imp: str) -> list[str]:
    """The roles ("svc.role on m1, m2") that import `imp`."""
    from ..inventory.select import machines_for

    out = []
    for sname, svc in sorted(doc["services"].items()):
        for rname, role in sorted(svc["roles"].items()):
            if imp in role["imports"]:
                ms = machines_for(doc, role["machines"], role["tags"])
                out.append(f"{sname}.{rname} on {', '.join(ms) or 'no machine'}")
    return out


# -- apply a service to tags ----------------------------------------------------------


def service_doc(doc: dict[str, Any], service: Any, type_: Any, roles: Any) -> dict[str, Any]:
    """`doc` with `service`'s roles given to the machines and tags in `roles`.

    `roles` maps a role name to {"machines": [...], "tags": [...]}.  An existing
    service keeps everything else (exports, imports, settings, secrets); a new
    one needs `type_` and gets plain roles.  A role left out keeps its selection.
    """
    from ..inventory.parse import NAME_RE

    errors: dict[str, str] = {}
    if not isinstance(service, str) or not NAME_RE.fullmatch(service):
        raise FormError({"service": "a service name is a-z, 0-9 and '-'"})
    if not isinstance(roles, dict) or not roles or len(roles) > MAX_ROLES:
        raise FormError({"roles": f"give 1..{MAX_ROLES} roles"})
    new = copy.deepcopy(doc)
    svc = new["services"].get(service)
    if svc is None:
        if not isinstance(type_, str) or not type_.strip() or len(type_) > 128:
            errors["type"] = "a new service needs a type (what the machines run)"
        svc = {"type": str(type_).strip(), "settings": {}, "roles": {}, "secrets": {}, "reload": ""}
    tags_in_use = {t for m in doc["machines"].values() for t in m["tags"]}
    for rname, sel in sorted(roles.items()):
        field = f"roles.{rname}"
        if not isinstance(rname, str) or not NAME_RE.fullmatch(rname):
            errors["roles"] = f"{str(rname)[:40]!r} is not a role name"
            continue
        if not isinstance(sel, dict) or set(sel) - {"machines", "tags"}:
            errors[field] = "expected {machines: [...], tags: [...]}"
            continue
        machines = _names(sel.get("machines"), f"{field}.machines", errors, limit=1024)
        tags = _names(sel.get("tags"), f"{field}.tags", errors)
        unknown = [m for m in machines if m not in doc["machines"]]
        if unknown:
            errors[f"{field}.machines"] = f"no machine {unknown[0]!r} in the inventory"
        nothing = [t for t in tags if t not in tags_in_use]
        if nothing:
            errors[f"{field}.tags"] = f"tag {nothing[0]!r} matches no machine"
        role = svc["roles"].get(rname) or {
            "machines": [],
            "tags": [],
            "settings": {},
            "exports": [],
            "imports": [],
        }
        role["machines"], role["tags"] = machines, tags
        svc["roles"][rname] = role
    if errors:
        raise FormError(errors)
    new["services"][service] = svc
    _doc_issues(new, errors, "service")
    if errors:
        raise FormError(errors)
    return new


def service_preview(
    old: dict[str, Any], new: dict[str, Any], service: str, online: set[str]
) -> dict[str, Any]:
    """Where each role lands, which secrets are made for whom, which imports are wired."""
    from ..inventory.select import machines_for
    from ..secrets.model import generator_for, holders, instances

    svc, before = new["services"][service], old["services"].get(service)
    roles = []
    for rname, role in sorted(svc["roles"].items()):
        was = before["roles"].get(rname) if before else None
        roles.append(
            {
                "role": rname,
                "machines": machines_for(new, role["machines"], role["tags"]),
                "before": machines_for(old, was["machines"], was["tags"]) if was else [],
                "tags": list(role["tags"]),
                "named": list(role["machines"]),
            }
        )
    old_holders = {
        i.id: holders(old, i.service, i.secret, i.scope_id)
        for i in instances(old)
        if i.service == service
    }
    secrets = []
    for inst in instances(new):
        if inst.service != service:
            continue
        hs = holders(new, inst.service, inst.secret, inst.scope_id)
        was = old_holders.pop(inst.id, None)
        keys = [(m, new["machines"][m]["node_key"]) for m in hs if m in online]
        secrets.append(
            {
                "id": inst.id,
                "holders": hs,
                "generator": generator_for(inst.id, keys),
                "change": "new" if was is None else ("rotated" if was != hs else "unchanged"),
            }
        )
    for sid, hs in sorted(old_holders.items()):
        secrets.append(
            {"id": sid, "holders": [], "generator": None, "change": f"dropped (held by {hs})"}
        )
    wiring = []
    for rname, role in sorted(svc["roles"].items()):
        consumers = machines_for(new, role["machines"], role["tags"])
        for imp in role["imports"]:
            isvc, _, irole = imp.partition(".")
            decl = new["services"][isvc]["roles"][irole]
            wiring.append(
                {
                    "import": imp,
                    "by": f"{service}.{rname}",
                    "from": machines_for(new, decl["machines"], decl["tags"]),
                    "to": consumers,
                    "values": list(decl["exports"]),
                }
            )
        if role["exports"]:
            # importers in this service are listed above, from their side
            others = [
                b for b in _importers(new, f"{service}.{rname}") if not b.startswith(f"{service}.")
            ]
            for by in others:
                wiring.append(
                    {
                        "import": f"{service}.{rname}",
                        "by": by,
                        "from": consumers,
                        "to": [],
                        "values": list(role["exports"]),
                    }
                )
    return {"roles": roles, "secrets": secrets, "wiring": wiring}


# -- the methods ----------------------------------------------------------------------


class GuidedEdits:
    def __init__(self, actions: ConsoleActions) -> None:
        self.actions = actions
        self.api = actions.api

    def register(self) -> None:
        web = ("web",)
        h = handler
        self.api.add(
            h(
                "console.machine_add_preview",
                "read",
                self.add_preview,
                "check a new machine's name, tags and key; the change it makes",
                params=("name", "tags", "key"),
                surfaces=web,
            ),
            h(
                "console.machine_add",
                "write",
                self.add,
                "add the machine the preview showed; its join token and QR code",
                params=("name", "tags", "key", "leaves", "digest"),
                surfaces=web,
            ),
            h(
                "console.machine_remove_preview",
                "read",
                self.remove_preview,
                "what removing a machine changes and what follows",
                params=("name",),
                surfaces=web,
            ),
            h(
                "console.machine_remove",
                "write",
                self.remove,
                "remove the machine the preview showed",
                params=("name", "leaves", "digest"),
                surfaces=web,
            ),
            h(
                "console.service_preview",
                "read",
                self.svc_preview,
                "where a service's roles land, its secrets and imports, before signing",
                params=("service", "type", "roles"),
                surfaces=web,
            ),
            h(
                "console.service_apply",
                "write",
                self.svc_apply,
                "apply the service the preview showed",
                params=("service", "type", "roles", "leaves", "digest"),
                surfaces=web,
            ),
        )

    async def _me(self) -> str:
        return (await api_call(self.api, "status"))["name"]

    async def _online(self) -> set[str]:
        topo = await api_call(self.api, "topology")
        return {m["name"] for m in topo["machines"] if m["online"]}

    @staticmethod
    def _refused(fields: dict[str, str]) -> dict[str, Any]:
        return {"errors": fields, "changes": [], "diff": "", "digest": ""}

    async def _apply(
        self, shown: dict[str, Any], new: dict[str, Any], params: dict[str, Any], message: str
    ) -> dict[str, Any]:
        check_head(shown, params.get("leaves"))
        if params.get("digest") != digest_of(shown["doc"], new):
            raise ControlError(
                ErrorCode.INVALID_PARAMS,
                "this is not the change the preview showed: review the new preview, then sign",
            )
        return await self.actions.sign_and_submit(new, shown, message)

    @staticmethod
    def _form(exc: FormError) -> ControlError:
        field, text = next(iter(exc.fields.items()))
        return ControlError(ErrorCode.INVALID_PARAMS, f"{field}: {text}; nothing was signed")

    # add

    async def add_preview(self, params: dict[str, Any]) -> dict[str, Any]:
        shown = await self.actions.current()
        doc = shown["doc"]
        base = {
            "leaves": shown["leaves"],
            "tags_known": sorted({t for m in doc["machines"].values() for t in m["tags"]}),
        }
        try:
            new = add_machine_doc(doc, params.get("name"), params.get("tags"), params.get("key"))
        except FormError as exc:
            return {**base, **self._refused(exc.fields)}
        name = params["name"]
        return {**base, "errors": {}, **_changes(doc, new), "gets": _machine_gets(new, name)}

    async def add(self, params: dict[str, Any]) -> dict[str, Any]:
        from .qr import qr_svg_uri

        shown = await self.actions.current()
        try:
            new = add_machine_doc(
                shown["doc"], params.get("name"), params.get("tags"), params.get("key")
            )
        except FormError as exc:
            raise self._form(exc) from None
        name = params["name"]
        result = await self._apply(shown, new, params, f"add machine {name} (web console)")
        invite = await api_call(self.api, "invite", {"machine": name})
        command = f"clanagent join {invite['token']}"
        return {
            **result,
            "machine": name,
            "token": invite["token"],
            "command": command,
            "seeds": invite["seeds"],
            "qr": qr_svg_uri(invite["token"]),
        }

    # remove

    async def remove_preview(self, params: dict[str, Any]) -> dict[str, Any]:
        shown = await self.actions.current()
        doc = shown["doc"]
        try:
            new = remove_machine_doc(doc, params.get("name"), await self._me())
        except FormError as exc:
            return {"leaves": shown["leaves"], "consequences": [], **self._refused(exc.fields)}
        name = params["name"]
        online = name in await self._online()
        return {
            "leaves": shown["leaves"],
            "errors": {},
            **_changes(doc, new),
            "consequences": removal_consequences(doc, new, name, online),
        }

    async def remove(self, params: dict[str, Any]) -> dict[str, Any]:
        shown = await self.actions.current()
        try:
            new = remove_machine_doc(shown["doc"], params.get("name"), await self._me())
        except FormError as exc:
            raise self._form(exc) from None
        name = params["name"]
        result = await self._apply(shown, new, params, f"remove machine {name} (web console)")
        return {**result, "machine": name}

    # services

    async def svc_preview(self, params: dict[str, Any]) -> dict[str, Any]:
        shown = await self.actions.current()
        doc = shown["doc"]
        base = {
            "leaves": shown["leaves"],
            "services": {
                s: {
                    "type": v["type"],
                    "roles": {
                        r: {"machines": x["machines"], "tags": x["tags"]}
                        for r, x in sorted(v["roles"].items())
                    },
                }
                for s, v in sorted(doc["services"].items())
            },
            "tags_known": sorted({t for m in doc["machines"].values() for t in m["tags"]}),
            "machines_known": sorted(doc["machines"]),
        }
        service = params.get("service")
        try:
            new = service_doc(doc, service, params.get("type"), params.get("roles"))
        except FormError as exc:
            return {**base, "preview": None, **self._refused(exc.fields)}
        assert isinstance(service, str)
        preview = service_preview(doc, new, service, await self._online())
        return {**base, "errors": {}, **_changes(doc, new), "preview": preview}

    async def svc_apply(self, params: dict[str, Any]) -> dict[str, Any]:
        shown = await self.actions.current()
        service = params.get("service")
        try:
            new = service_doc(shown["doc"], service, params.get("type"), params.get("roles"))
        except FormError as exc:
            raise self._form(exc) from None
        return await self._apply(shown, new, params, f"apply service {service} (web console)")
