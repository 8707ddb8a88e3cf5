"""The cluster side: CC service and proxy, NC agent and drivers, SC (see docs/cluster-api.md)."""
