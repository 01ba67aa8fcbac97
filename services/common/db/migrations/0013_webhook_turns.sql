-- Webhook attempts take turns between owners, and each owner has a bound on its attempts in
-- flight (services/common/db/webhooks.py claim_due): the leased attempts are counted by owner
-- at every claim, through this index, however many attempts are scheduled for later.
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (leased_until)
    WHERE state = 'scheduled' AND leased_until IS NOT NULL;
