# anonticket as a Twisted application file, for `twistd -ny tap/anonticket.tac`.
#
# Configured from the environment only (ANONTICKET_*), exactly as the plugin reads it, e.g.
#   ANONTICKET_PUBLIC=tcp:18080:interface=127.0.0.1 ANONTICKET_NO_MONITOR=1 \
#       twistd -ny tap/anonticket.tac
from twisted.application.service import Application

from anonticket.tap import Options, makeService

options = Options()
options.parseOptions([])
application = Application("anonticket")
makeService(options).setServiceParent(application)
