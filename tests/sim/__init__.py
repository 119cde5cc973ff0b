"""The cluster simulation harness: many sans-IO gossip nodes on one virtual clock.

`network` decides which datagram arrives when, `driver` runs the event loop
(deliveries and node timers), `cluster` builds and joins N real nodes and
measures them, `scenarios` scripts the standard experiments.  `fakenode`
holds stand-ins used to test the harness itself.  `agents` runs N *whole*
agents (gossip, store, inventory, record checks and the services, on the
same ports the real agent builds) in trio on a MockClock over the same
`network`.
"""

from tests.sim.cluster import Cluster, peak_rss_mb
from tests.sim.driver import Driver, EventLog, SimulationError
from tests.sim.network import Latency, Network

__all__ = ["Cluster", "Driver", "EventLog", "Latency", "Network", "SimulationError", "peak_rss_mb"]
