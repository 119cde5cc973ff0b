"""mesh: finding the clan's machines (mDNS, Tor, endpoints records, the
inventory), choosing a path to each, and keeping a WireGuard mesh to them;
sans-IO cores beside the trio shell `service` (see docs/architecture.md)."""
