"""Human in the loop: the assist queue over ZeroMQ, the associate clients, and the ledger."""
