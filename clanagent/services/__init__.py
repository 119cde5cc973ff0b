"""services: exports of service roles, published as records and wired into
the machines that import them (`wiring` is sans-IO, `render` writes files,
`service` is the trio shell, `api` its control method)."""

from .wiring import (
    EXPORT_KIND,
    ServicesError,
    collect_exports,
    export_values,
    resolve_imports,
    services_view,
)

__all__ = [
    "EXPORT_KIND",
    "ServicesError",
    "collect_exports",
    "export_values",
    "resolve_imports",
    "services_view",
]
