"""What waking the event loop costs on this machine, with nothing else to do: the floor under
every idle figure.

    python -m bench.wakeups                     # 20, 50, 100 and 250 wake-ups a second, 10 s each
    python -m bench.wakeups --rates 4,51 --seconds 20

Each rate runs in a process of its own on uvloop: 256 tasks, each sleeping on a timer, their
wake-ups spread evenly over the second (as idle shards' polls or the heartbeats of 256
subscriptions are when nothing aligns them), and no other work. The process's CPU time
(user + system) over the window is reported as a share of one core and per wake-up.

On a virtual machine a loop that wakes from idle pays for the virtual CPU's trip out of and
back into its idle state; here that was 110-200 µs a wake-up, far more than the Python a poll
runs. Idle shards are therefore cheap when their wake-ups are few (the poller's coalescing
grid, source/pages.py), and each event a subscription pushes on its own costs at least one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

TASKS = 256


async def _wake(rate: int, seconds: float) -> float:
    """CPU seconds of `rate` wake-ups a second, spread over TASKS timers, for `seconds`."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5  # past the tasks' own start-up
    period = TASKS / rate

    async def one(offset: float) -> None:
        when = start + offset
        while when < start + seconds:
            await asyncio.sleep(max(0.0, when - loop.time()))
            when += period

    await asyncio.sleep(0.5 - 0.05)
    cpu = time.process_time()
    await asyncio.gather(*(one(i / rate) for i in range(TASKS)))
    return time.process_time() - cpu


def _child(rate: int, seconds: float) -> None:
    import uvloop

    cpu = uvloop.run(_wake(rate, seconds))
    print(json.dumps({"rate": rate, "seconds": seconds, "cpu_seconds": cpu}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", default="20,50,100,250", help="wake-ups a second, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="window a rate")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.seconds)
        return
    results = []
    print(f"{'wake-ups/s':>10} {'core %':>8} {'µs each':>8}")
    for rate in (int(r) for r in args.rates.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.wakeups",
                "--child",
                str(rate),
                "--seconds",
                str(args.seconds),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        figure = json.loads(out.strip().splitlines()[-1])
        cpu = figure["cpu_seconds"]
        figure["core_percent"] = round(100 * cpu / args.seconds, 2)
        figure["microseconds_each"] = round(1e6 * cpu / (rate * args.seconds))
        results.append(figure)
        print(f"{rate:>10} {figure['core_percent']:>7.2f}% {figure['microseconds_each']:>8}")
    print(json.dumps({"wakeups": results}))


if __name__ == "__main__":
    main()
