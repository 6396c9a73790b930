#!/usr/bin/env python3
"""A device receiving commands on paho-mqtt (PyPI), for the end-to-end tests: subscribes to
--topic at QoS 1, prints "SUBSCRIBED" once the broker granted it, then "MSG <qos> <topic>
<payload>" (unbuffered) for each message, and exits 0 after --expect messages, 1 at --deadline."""

import argparse
import sys
import threading

import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False)
    received = []
    done = threading.Event()

    def on_connect(client, _userdata, _flags, reason_code, _properties):
        if not reason_code.is_failure:
            client.subscribe(args.topic, qos=1)

    def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
        if all(not code.is_failure for code in reason_codes):
            print("SUBSCRIBED", flush=True)

    def on_message(_client, _userdata, message):
        received.append(message)
        print(f"MSG {message.qos} {message.topic} {message.payload.decode('utf-8', 'replace')}", flush=True)
        if len(received) >= args.expect:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=10)
    client.loop_start()
    finished = done.wait(args.deadline)
    client.disconnect()
    client.loop_stop()
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    main()
