#!/usr/bin/env python3
"""A medical device on paho-mqtt (PyPI), for the end-to-end tests: publishes --count readings
{"device": <client id>, "n": <n>} to devices/<client id>/vitals at QoS 1 (or 2), at most
--inflight unacknowledged at once, and prints "ACK <n>" (unbuffered) for each reading the
server acknowledged. It keeps its session (clean session off) and reconnects when the
connection drops, resending what was not acknowledged, as a device with a persistent session
does; it exits 0 once every reading is acknowledged, 1 at --deadline."""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--qos", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--mqtt5", action="store_true")
    args = parser.parse_args()

    protocol = mqtt.MQTTv5 if args.mqtt5 else mqtt.MQTTv311
    if args.mqtt5:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=protocol)
    else:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False, protocol=protocol
        )
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.max_inflight_messages_set(args.inflight)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=0.1, max_delay=1)

    # paho calls on_publish holding its own lock, so publish() is never called under ours; an
    # acknowledgement may then arrive before its mid is recorded.
    lock = threading.Lock()
    by_mid = {}
    early = set()
    acked = set()
    done = threading.Event()

    def settle(n):
        if n not in acked:
            acked.add(n)
            print(f"ACK {n}", flush=True)
        if len(acked) == args.count:
            done.set()

    def on_publish(_client, _userdata, mid, reason_code, _properties):
        if reason_code.is_failure:
            return
        with lock:
            if mid in by_mid:
                settle(by_mid[mid])
            else:
                early.add(mid)

    client.on_publish = on_publish
    if args.mqtt5:
        properties = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        client.connect_async("127.0.0.1", args.port, keepalive=10, clean_start=False, properties=properties)
    else:
        client.connect_async("127.0.0.1", args.port, keepalive=10)
    client.loop_start()
    topic = f"devices/{args.client_id}/vitals"
    for n in range(args.first, args.first + args.count):
        payload = json.dumps({"device": args.client_id, "n": n})
        info = client.publish(topic, payload, qos=args.qos)
        with lock:
            by_mid[info.mid] = n
            if info.mid in early:
                early.discard(info.mid)
                settle(n)
    finished = done.wait(args.deadline)
    client.disconnect()
    client.loop_stop()
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    main()
