"""The two Klein sites: :mod:`.public` (redeem, token status, passes) and :mod:`.internal`
(metrics, health, spends, revocations, webhooks), on privacy-minded HTTP plumbing: the site and
its guard (:mod:`.site`), connections (:mod:`.channel`), requests and their deadline
(:mod:`.request`), JSON in and out (:mod:`.jsonio`), errors (:mod:`.errors`), and store calls
answered 503 when the store fails (:mod:`.storecalls`)."""

# The log namespace of the HTTP layer's own lines (errors, request deadlines, the sites' caps,
# store failures): the one they had before web/http.py was split, so log filters keep working.
HTTP_LOG_NAMESPACE = "anonticket.web.http"
