"""gossip: peer sessions, SWIM membership and record dissemination (see DESIGN.md)."""
