"""Sends one MLLP frame (a file's content, segments ending in \\r) with python-hl7's
MLLPClient, reads the whole answer frame, and parses it with python-hl7's own batch parser
(hl7.parse_hl7: FHS/BHS/BTS/FTS aware). Prints one JSON line:
{"batches": [{"header": "BHS", "trailer": "BTS|2|", "acks": [["AA", "B1"], ...]}], "file": bool}
Usage: python hl7_batch_send.py <port> <file>"""
import json
import sys

import hl7
from hl7.client import MLLPClient

port, path = int(sys.argv[1]), sys.argv[2]
with open(path, "rb") as f:
    payload = f.read()
with MLLPClient("127.0.0.1", port) as client:
    client.socket.settimeout(60)
    client.socket.sendall(b"\x0b" + payload + b"\x1c\r")
    answer = b""
    while not answer.endswith(b"\x1c\r"):
        chunk = client.socket.recv(65536)
        if not chunk:
            break
        answer += chunk
text = answer.strip(b"\x0b\x1c\r").decode("utf-8") + "\r"
parsed = hl7.parse_hl7(text)
file = isinstance(parsed, hl7.File)
batches = list(parsed) if file else [parsed]
out = []
for batch in batches:
    acks = []
    messages = list(batch) if isinstance(batch, hl7.Batch) else [batch]
    for message in messages:
        msa = message.segment("MSA")
        acks.append([str(msa[1]), str(msa[2])])
    out.append(
        {
            "header": str(batch.header)[:3] if isinstance(batch, hl7.Batch) else "MSH",
            "trailer": str(batch.trailer) if isinstance(batch, hl7.Batch) else "",
            "acks": acks,
        }
    )
print(json.dumps({"file": file, "batches": out}))
