"""A downstream MLLP receiver built on hl7apy's MLLPServer, for the sink's tests.

Prints `PORT <n>` once listening (it binds port 0), then `RECEIVED <control id>` for each
message. Answers AA, or AE to messages whose control id starts with REJECT. hl7apy parses each
message first; one it cannot parse gets no answer (hl7apy closes the connection).
"""

import datetime
import sys

from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

SB, EB, CR = "\x0b", "\x1c", "\x0d"


class AckHandler(AbstractHandler):
    def reply(self):
        message = parse_message(self.incoming_message, find_groups=False)
        msh = message.msh
        control_id = msh.msh_10.value
        event = msh.msh_9.msh_9_2.value if msh.msh_9.msh_9_2 else ""
        code = "AE" if control_id.startswith("REJECT") else "AA"
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S")
        ack = "\r".join(
            [
                "MSH|^~\\&|{}|{}|{}|{}|{}||ACK^{}^ACK|A{}|P|{}".format(
                    msh.msh_5.value, msh.msh_6.value, msh.msh_3.value, msh.msh_4.value,
                    now, event, control_id, msh.msh_12.value,
                ),
                "MSA|{}|{}|{}".format(code, control_id, "rejected by test peer" if code == "AE" else ""),
            ]
        )
        print("RECEIVED {}".format(control_id), flush=True)
        return SB + ack + CR + EB + CR


class AnyMessageType(dict):
    """MLLPServer looks handlers up by the whole MSH-9; this one handles every type."""

    def __missing__(self, key):
        return (AckHandler,)


def main():
    server = MLLPServer("127.0.0.1", 0, AnyMessageType(), timeout=10)
    print("PORT {}".format(server.server_address[1]), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
