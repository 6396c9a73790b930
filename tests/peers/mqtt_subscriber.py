#!/usr/bin/env python3
"""A device receiving commands on paho-mqtt (PyPI), for the end-to-end tests: subscribes to
--topic at --qos (1 by default), prints "SUBACK <reason code values>" for the answer and
"SUBSCRIBED" once every filter was granted, then "MSG <qos> <topic> <payload>" (unbuffered)
for each message, and exits 0 after --expect messages (at once after the SUBACK with
--expect 0), 1 at --deadline. Optional --host (127.0.0.1), --username/--password, --mqtt5;
--crash-before-ack: the process ends abruptly on the first message, before acknowledging it
(a device crash)."""

import argparse
import os
import sys
import threading

import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--qos", type=int, default=1)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--mqtt5", action="store_true")
    parser.add_argument("--crash-before-ack", action="store_true")
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()

    # Manual acknowledgements: the PUBACK of the last message is queued before "done" lets the
    # main thread queue the DISCONNECT behind it, so no acknowledgement is lost at the exit.
    if args.mqtt5:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
    else:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False, manual_ack=True
        )
    if args.username:
        client.username_pw_set(args.username, args.password)
    received = []
    done = threading.Event()

    def on_connect(client, _userdata, _flags, reason_code, _properties):
        # Subscribes on every connection: a listener keeps no subscriptions across them.
        if not reason_code.is_failure:
            client.subscribe(args.topic, qos=args.qos)

    def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
        print("SUBACK " + " ".join(str(code.value) for code in reason_codes), flush=True)
        if all(not code.is_failure for code in reason_codes):
            print("SUBSCRIBED", flush=True)
        if args.expect == 0:
            done.set()

    def on_message(client, _userdata, message):
        received.append(message)
        if args.crash_before_ack:
            print(f"MSG {message.qos} {message.topic} {message.payload.decode('utf-8', 'replace')}", flush=True)
            os._exit(0)
        client.ack(message.mid, message.qos)
        print(f"MSG {message.qos} {message.topic} {message.payload.decode('utf-8', 'replace')}", flush=True)
        if len(received) >= args.expect:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=10)
    client.loop_start()
    finished = done.wait(args.deadline)
    client.disconnect()
    client.loop_stop()
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    main()
