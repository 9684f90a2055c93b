"""The two Klein sites: :mod:`.public` (redeem, token status) and :mod:`.internal` (metrics,
revoke, health), on the privacy-minded HTTP plumbing of :mod:`.http`."""
