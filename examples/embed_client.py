#!/usr/bin/python3
"""Embed texts through the sglora daemon, with one of your cached adapters applied:
    embed_client.py [--system] ADAPTER_ID TEXT...     (ADAPTER_ID "" = the base model)
One line of space-separated floats per text. Needs only jeepney (Debian: python3-jeepney)."""

import struct
import sys

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import unwrap_msg

bus, args = ("SYSTEM", sys.argv[2:]) if sys.argv[1:2] == ["--system"] else ("SESSION", sys.argv[1:])
adapter_id, texts = args[0], args[1:]
sglora = DBusAddress("/org/sglora/Generator1", bus_name="org.sglora.Generator1", interface="org.sglora.Generator1")
with open_dbus_connection(bus=bus) as conn:
    reply = conn.send_and_get_reply(new_method_call(sglora, "Embed", "sasa{sv}", (adapter_id, texts, {})))
dim, blob = unwrap_msg(reply)  # raises DBusErrorResponse (Busy, NotFound, InvalidArgument, ...)
values = struct.unpack(f"<{len(blob) // 4}f", blob)
for i in range(0, len(values), dim):
    print(" ".join(repr(x) for x in values[i : i + dim]))
