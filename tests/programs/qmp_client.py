"""Drive a running `procmig send --qmp PATH` with the real qemu.qmp client.

    python3 qmp_client.py follow PATH LOW_RATE   # poll until completed, lower max-bandwidth on the way
    python3 qmp_client.py cancel PATH            # cancel as soon as the migration is active

Prints one JSON line of what it saw; exits non-zero with the reason when
something QMP-shaped is wrong. The Rust test (tests/qmp.rs) checks the rest.
"""

import asyncio
import json
import sys
import time

from qemu.qmp import QMPClient


async def main(mode, path, low=None):
    qmp = QMPClient("procmig-test")
    for _ in range(200):
        try:
            await qmp.connect(path)
            break
        except Exception:  # the socket is not there yet
            await asyncio.sleep(0.05)
    else:
        sys.exit("could not connect")
    seen = {"statuses": [], "events": [], "transferred": []}

    async def events():
        async for ev in qmp.events:
            seen["events"].append(ev["event"] + ":" + json.dumps(ev.get("data", {}), sort_keys=True))

    listener = asyncio.ensure_future(events())
    try:
        if mode == "cancel":
            while True:
                r = await qmp.execute("query-migrate")
                if r["status"] == "active":
                    await qmp.execute("migrate_cancel")
                    break
                await asyncio.sleep(0.01)
            # The status turns to cancelled before the socket goes.
            while True:
                r = await qmp.execute("query-migrate")
                seen["statuses"].append(r["status"])
                if r["status"] in ("cancelled", "failed", "completed"):
                    break
                await asyncio.sleep(0.02)
        else:
            lowered = None
            rate_after = None
            while True:
                r = await qmp.execute("query-migrate")
                s = r["status"]
                if not seen["statuses"] or seen["statuses"][-1] != s:
                    seen["statuses"].append(s)
                if "ram" in r:
                    seen["transferred"].append(r["ram"]["transferred"])
                if s == "active" and lowered is None and r["ram"]["transferred"] > 0:
                    await qmp.execute("migrate-set-parameters", {"max-bandwidth": int(low)})
                    p = await qmp.execute("query-migrate-parameters")
                    assert p["max-bandwidth"] == int(low), p
                    lowered = (time.monotonic(), r["ram"]["transferred"])
                elif lowered and rate_after is None and time.monotonic() - lowered[0] > 1.5 and s == "active":
                    # Bytes per second over the 1.5 s after the change.
                    rate_after = (r["ram"]["transferred"] - lowered[1]) / (time.monotonic() - lowered[0])
                    seen["rate_after"] = rate_after
                    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
                if s in ("completed", "failed", "cancelled"):
                    seen["final"] = r
                    break
                await asyncio.sleep(0.01)
        # Errors come back as QMP errors, the connection stays usable.
        try:
            await qmp.execute("no-such-command")
            seen["unknown"] = "accepted"
        except Exception as e:
            seen["unknown"] = type(e).__name__ + ": " + str(e)
        await asyncio.sleep(0.1)
    finally:
        listener.cancel()
        await qmp.disconnect()
    print(json.dumps(seen))


asyncio.run(main(*sys.argv[1:]))
