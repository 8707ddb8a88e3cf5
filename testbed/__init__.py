"""testbed: real systemd hosts without Docker (systemd-nspawn over an overlay of /)."""
