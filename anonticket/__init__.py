"""anonticket: pay Monero to an integrated address, redeem the payment ID for a service token."""

__version__ = "0.3.0"
