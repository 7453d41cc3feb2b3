"""Everything that runs inside the TEE: keys, attestation providers, server, engine."""
