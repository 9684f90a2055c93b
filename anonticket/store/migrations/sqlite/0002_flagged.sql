-- A credited transfer (unclaimed or claimed) that the wallet stops reporting within the
-- re-check window - a reorg deeper than --min-confirmations - is flagged, never re-credited.
-- An unclaimed flagged payment is not redeemable until the wallet reports it again.
ALTER TABLE payments ADD COLUMN flagged_at INTEGER;
