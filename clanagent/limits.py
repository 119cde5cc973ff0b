"""Clan-size targets and every record and message size limit derived from them.

Owns: the numbers that bound what one record or one gossip message may hold.
Each limit below is computed from the clan-size targets and a few measured
byte costs, so raising a target moves every limit with it.  No decoder keeps
a bound of its own that a clan of the target size would hit:
docs/decisions.md ("Sizes") has the table and the arithmetic.

Targets:

* `TARGET_MACHINES` (1000): a clan this size works now -- one inventory
  record lists every machine, every decode limit admits it.
* `PLANNED_MACHINES` (10,000): every table limit (map and array entries,
  anti-entropy digest origins) already admits it; one inventory record does
  not (about 1.9 MB of machine entries against the 512 KiB record bound), so
  at that size the inventory is to be split over several records.

Measured costs (tests/test_clan_sizes.py checks them):

* `MACHINE_ENTRY_BYTES`: one machine in a signed inventory record is 186
  bytes (name, three 32-byte keys, tags, flags, no endpoints); 200 with margin.
* `SEALED_PER_RECIPIENT`: a sealed endpoint list costs 148 bytes per member
  it is sealed to (a 64-character hex key with its header, a bin8 header and
  an 80-byte sealed box).
* `DIGEST_ENTRY_BYTES`: one origin in an anti-entropy digest is 44 bytes
  (array header, bin8 header, 32-byte key, up to 9-byte version).

Must never: import anything of the agent (every part imports this).
"""

from __future__ import annotations

__all__ = [
    "TARGET_MACHINES",
    "PLANNED_MACHINES",
    "MAX_FRAME",
    "MAX_RECORD_BYTES",
    "MAX_TABLE",
    "MACHINE_ENTRY_BYTES",
    "SEALED_PER_RECIPIENT",
    "DIGEST_ENTRY_BYTES",
    "MACHINES_PER_RECORD",
    "MAX_SEALED",
    "MAX_DIGEST_ORIGINS",
    "AE_BUDGET",
    "GOSSIP_BUDGET",
]

# -- targets
TARGET_MACHINES = 1000
PLANNED_MACHINES = 10_000

# -- measured byte costs
MACHINE_ENTRY_BYTES = 200
SEALED_PER_RECIPIENT = 148
DIGEST_ENTRY_BYTES = 44

# -- derived limits
# One session frame (gossip.session.DEFAULT_MAX_PLAINTEXT) and the codec's
# default max_frame: the largest message any peer sends us.
MAX_FRAME = 1 << 20
# Entries in one map or array of a record: the planned clan's machine table
# (the largest table a record holds), rounded up to a power of two.
MAX_TABLE = 1 << (PLANNED_MACHINES - 1).bit_length()  # 16384
# A record must fit an anti-entropy reply next to a full digest of the planned
# clan: half a frame each.  A record larger than this could never be synced.
AE_BUDGET = MAX_FRAME // 2  # 512 KiB
MAX_RECORD_BYTES = AE_BUDGET
# Origins in one digest: what fits the other half of the frame (11,900).
MAX_DIGEST_ORIGINS = (MAX_FRAME - AE_BUDGET - 64) // DIGEST_ENTRY_BYTES
# Machines one inventory record holds (2621); beyond, the inventory is split.
MACHINES_PER_RECORD = MAX_RECORD_BYTES // MACHINE_ENTRY_BYTES
# One machine's sealed endpoints, sealed to every member of the target clan.
MAX_SEALED = 1024 + TARGET_MACHINES * SEALED_PER_RECIPIENT  # 149,024 bytes
# One gossip (push) datagram: small records ride the epidemic; a record over
# this (an inventory of more than about 350 machines) travels by
# anti-entropy pull only, so each node fetches it about once instead of
# every node pushing it to `gossip_nodes` peers `transmit_limit` times.
GOSSIP_BUDGET = 64 * 1024

# The targets hold, or the module does not import.
assert MACHINES_PER_RECORD >= TARGET_MACHINES
assert MAX_TABLE >= PLANNED_MACHINES
assert MAX_DIGEST_ORIGINS >= PLANNED_MACHINES
assert MAX_RECORD_BYTES + MAX_DIGEST_ORIGINS * DIGEST_ENTRY_BYTES < MAX_FRAME
assert MAX_SEALED < MAX_RECORD_BYTES
