#!/usr/bin/env python3
"""A device on paho-mqtt (PyPI) over WebSocket (ws://, or wss:// with --cafile), for the
listener tests. Prints "CONNACK <reason code> <name>" once answered (and exits 2 when
refused), "ERROR <text>" and exits 3 when it cannot connect (a failed upgrade or TLS
handshake), then publishes --count readings {"device": <client id>, "n": <n>} to
devices/<client id>/vitals at --qos and prints "ACK <n>" (unbuffered) for each one the
listener acknowledged, "NACK <n> <reason code>" for an MQTT 5 refusal (with --wait-for-go,
only after a line on stdin). Exits 0 once every
reading is answered, 1 at --deadline. No reconnects: the test counts exactly."""

import argparse
import json
import sys
import threading

import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/mqtt")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--qos", type=int, default=1)
    parser.add_argument("--payload-size", type=int, default=0, help="pad each payload to this size")
    parser.add_argument("--mqtt5", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--wait-for-go", action="store_true", help="once connected, publish only after a line on stdin")
    args = parser.parse_args()

    protocol = mqtt.MQTTv5 if args.mqtt5 else mqtt.MQTTv311
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=protocol, transport="websockets"
    )
    client.ws_set_options(path=args.path)
    if args.cafile:
        client.tls_set(ca_certs=args.cafile, certfile=args.cert, keyfile=args.key)
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.max_inflight_messages_set(max(args.count, 1))
    client.reconnect_delay_set(min_delay=60, max_delay=60)

    lock = threading.Lock()
    by_mid = {}
    early = {}
    answered = set()
    done = threading.Event()
    connected = threading.Event()
    refused = threading.Event()

    def settle(n, reason_code):
        if n in answered:
            return
        answered.add(n)
        if reason_code.is_failure:
            print(f"NACK {n} {reason_code.value}", flush=True)
        else:
            print(f"ACK {n}", flush=True)
        if len(answered) == args.count:
            done.set()

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        print(f"CONNACK {reason_code.value} {reason_code}", flush=True)
        if reason_code.is_failure:
            refused.set()
        else:
            connected.set()

    def on_publish(_client, _userdata, mid, reason_code, _properties):
        with lock:
            if mid in by_mid:
                settle(by_mid[mid], reason_code)
            else:
                early[mid] = reason_code

    client.on_connect = on_connect
    client.on_publish = on_publish
    try:
        client.connect(args.host, args.port, keepalive=30)
    except Exception as error:  # the upgrade or the TLS handshake failed
        print(f"ERROR {error}", flush=True)
        sys.exit(3)
    client.loop_start()
    # Wait for the CONNACK before publishing, so a refusal is seen as such.
    waited = 0.0
    while not (connected.is_set() or refused.is_set()) and waited < args.deadline:
        connected.wait(0.05)
        waited += 0.05
    if refused.is_set():
        client.loop_stop()
        sys.exit(2)
    if not connected.is_set():
        print("ERROR no CONNACK", flush=True)
        client.loop_stop()
        sys.exit(3)
    if args.wait_for_go:
        sys.stdin.readline()
    topic = f"devices/{args.client_id}/vitals"
    for n in range(args.count):
        payload = json.dumps({"device": args.client_id, "n": n})
        if args.payload_size > len(payload):
            payload = payload + " " * (args.payload_size - len(payload))
        info = client.publish(topic, payload, qos=args.qos)
        with lock:
            by_mid[info.mid] = n
            if info.mid in early:
                settle(n, early.pop(info.mid))
    finished = done.wait(args.deadline)
    client.disconnect()
    client.loop_stop()
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    main()
