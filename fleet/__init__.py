"""The fleet: signed models published to every cell (Clone pattern over ZeroMQ with CURVE), staged
rollout (shadow, canary, everyone) with automatic rollback, cell status, ledger rows shipped to the
learner exactly once, and distributed training under torchrun. See docs/fleet.md."""
