"""The baseline: a bare Klein app on the same Twisted, answering the daemon's two public routes
and the internal site's spend route with a constant JSON body of a given size (bench only, never
part of the product).

    baseline.py PORT --post-size N --get-size M [--tuned]

POST /api/v1/redeem and POST /api/v1/token/{token}/spend parse the (small) JSON body and answer
N bytes; GET /api/v1/token/{token} answers M bytes.  What the daemon adds on top of this floor
(parsing, the store, metrics, its request plumbing) is what its ratio to the baseline measures.

As issue #6 defines it, the baseline is *bare*: Twisted's and Klein's defaults.  ``--tuned``
gives it the daemon's process and request settings (the start-up heap frozen for the garbage
collector, no form parsing of POST bodies): against that floor the ratio shows only the work the
daemon adds, with what its settings win counted for neither side.
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Any

from klein import Klein
from twisted.web.server import Request, Site


def body_of_size(size: int) -> bytes:
    empty = b'{"status":"ok","pad":""}'
    return empty[:-2] + b"x" * max(0, size - len(empty)) + empty[-2:]


class QuietSite(Site):
    # The daemon writes no access log either; formatting one would only slow the floor down.
    noisy = False

    def log(self, request: object) -> None:
        pass


class TunedRequest(Request):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # As the daemon's requests: Twisted would parse every POST's Content-Type (with the
        # email package) to look for a form body.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)


def build(post_size: int, get_size: int) -> Klein:
    app = Klein()
    post_body, get_body = body_of_size(post_size), body_of_size(get_size)

    def answer(request: Any, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return body

    @app.route("/api/v1/redeem", methods=["POST"])
    def redeem(request: Any) -> bytes:
        json.loads(request.content.read())
        return answer(request, post_body)

    @app.route("/api/v1/token/<string:token>/spend", methods=["POST"])
    def spend(request: Any, token: str) -> bytes:
        json.loads(request.content.read())
        return answer(request, post_body)

    @app.route("/api/v1/token/<string:token>", methods=["GET"])
    def token(request: Any, token: str) -> bytes:
        return answer(request, get_body)

    return app


def main() -> None:
    from twisted.internet import reactor as installed  # noqa: TID251 - an entry point

    reactor: Any = installed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--post-size", type=int, default=100)
    parser.add_argument("--get-size", type=int, default=100)
    parser.add_argument("--tuned", action="store_true", help="the daemon's settings")
    args = parser.parse_args()
    site = QuietSite(build(args.post_size, args.get_size).resource())
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    if args.tuned:
        site.requestFactory = TunedRequest
        # As anonticket.tap.freeze_startup_heap does.
        gc.collect()
        gc.freeze()
    reactor.run()


if __name__ == "__main__":
    main()
