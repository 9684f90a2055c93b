"""Unlinkable passes: a Privacy Pass issuer, token type 0x0001 (SPEC §14, docs/passes.md)."""
